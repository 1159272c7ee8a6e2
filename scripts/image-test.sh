#!/usr/bin/env bash
# The container image, built and run (`make image-test`; not part of `make test`).
#
# Builds a Debian bookworm base with debootstrap (no image registry needed; cached as an image), builds
# the image on it (--build-arg BASE_IMAGE), runs it with --network host on 127.0.0.1, and checks:
#   /health answers 200 (and Docker's HEALTHCHECK turns healthy), one chat completion with the official
#   openai client, the server (PID 1) runs as a non-root user, the native kernels were built when the
#   image was built (none compiled or changed at start, a native level loaded), and `docker stop`
#   drains a request in flight and exits 0.
# Prints the time of each phase, the time to the first healthy response and the image size. Exits
# non-zero, saying why, at the first failed check.
#
# Needs root (debootstrap, dockerd). Installs docker.io and debootstrap with apt-get where missing, and
# starts `dockerd --storage-driver=vfs` where no daemon answers (it is left running).
# Settings (environment):
#   BASE_IMAGE            build on this image instead of the debootstrapped one (e.g. python:3.11-slim)
#   IMAGE_TEST_BASE       tag of the debootstrapped base (leanserve-base:bookworm); delete it to rebuild it
#   IMAGE_TEST_IMAGE      tag of the image built (leanserve:image-test)
#   IMAGE_TEST_PORT       server port on 127.0.0.1 (18080)
#   IMAGE_TEST_PIP_PORT   port on 127.0.0.1 that serves the host's local pip sources to the build (18081)
#   IMAGE_TEST_NO_CACHE=1 build without Docker's layer cache
#   IMAGE_TEST_KEEP_CACHE=1  keep the build's untagged layers (by default removed at the end: the vfs
#                         driver stores each layer as a full copy, ~2-3 GB each here)
#   IMAGE_TEST_KEEP=1     leave the container (stopped) for inspection
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
BASE_TAG=${IMAGE_TEST_BASE:-leanserve-base:bookworm}
IMAGE=${IMAGE_TEST_IMAGE:-leanserve:image-test}
PORT=${IMAGE_TEST_PORT:-18080}
PIP_PORT=${IMAGE_TEST_PIP_PORT:-18081}
NAME=leanserve-image-test
HEALTH_DEADLINE_S=${IMAGE_TEST_HEALTH_DEADLINE_S:-300}
URL=http://127.0.0.1:$PORT
WORK=$(mktemp -d /tmp/leanserve-image-test.XXXXXX)
PIP_SERVER_PID=

say() { printf '\n== %s\n' "$*"; }
fail() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

cleanup() {
    [ -n "$PIP_SERVER_PID" ] && kill "$PIP_SERVER_PID" 2>/dev/null || true
    if [ "${IMAGE_TEST_KEEP:-0}" != 1 ]; then
        docker rm -f "$NAME" >/dev/null 2>&1 || true
    fi
    # Untagged layers of this Dockerfile's builds (the builder stage, a replaced image), not others'.
    if [ "${IMAGE_TEST_KEEP_CACHE:-0}" != 1 ] && docker info >/dev/null 2>&1; then
        docker image prune -f --filter label=org.opencontainers.image.title=leanserve 2>/dev/null \
            | sed -n 's/^Total reclaimed space: /removed the build'"'"'s untagged layers: /p' || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap and dockerd need it)"
[ -x "$PY" ] || fail "$PY not found: run 'make install' first (the openai client comes from the venv)"
"$PY" -c "import openai" 2>/dev/null || fail "the openai package is not in $PY's environment ('make install')"

# ---- tools and the daemon ---------------------------------------------------------------------------------
missing=()
command -v docker >/dev/null || missing+=(docker.io)
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd --storage-driver=vfs (log: /tmp/leanserve-image-test-dockerd.log)"
    nohup dockerd --storage-driver=vfs >/tmp/leanserve-image-test-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || fail "dockerd did not start (see /tmp/leanserve-image-test-dockerd.log)"
fi
# The legacy builder: BuildKit would fetch the `# syntax` frontend from a registry.
export DOCKER_BUILDKIT=0
DOCKER_ROOT=$(docker info -f '{{.DockerRootDir}}')
FREE_GB=$(df -BG --output=avail "$DOCKER_ROOT" | tail -1 | tr -dc 0-9)
if [ "$(docker info -f '{{.Driver}}')" = vfs ] && [ "$FREE_GB" -lt "${IMAGE_TEST_MIN_FREE_GB:-40}" ]; then
    fail "$FREE_GB GB free under $DOCKER_ROOT: a build on the vfs driver needs about 40 GB (IMAGE_TEST_MIN_FREE_GB)"
fi

# ---- the base image -----------------------------------------------------------------------------------------
if [ -n "${BASE_IMAGE:-}" ]; then
    BASE=$BASE_IMAGE
    say "base: $BASE (given)"
elif docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    BASE=$BASE_TAG
    say "base: $BASE (already built; docker rmi $BASE to rebuild it)"
else
    BASE=$BASE_TAG
    # The Debian mirror this machine's apt uses (deb822 .sources or one-line lists), read now.
    MIRROR=$("$PY" - <<'EOF'
import glob, re
found = []
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
        if ("deb" in fields.get("Types", "").split() and "bookworm" in fields.get("Suites", "").split()
                and fields.get("Enabled", "yes") != "no"):
            found += fields.get("URIs", "").split()
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
            found.append(words[1])
print(found[0] if found else "")
EOF
)
    [ -n "$MIRROR" ] || fail "no Debian bookworm mirror in /etc/apt/sources.list{,.d}"
    say "base: debootstrap bookworm from this machine's apt mirror, then docker import as $BASE"
    t=$(now)
    debootstrap --variant=minbase --include=python3 bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap failed"; }
    DEBOOTSTRAP_S=$(since "$t")
    t=$(now)
    tar -C "$WORK/rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$BASE" >/dev/null
    rm -rf "$WORK/rootfs"
    echo "debootstrap: ${DEBOOTSTRAP_S} s; docker import: $(since "$t") s;" \
         "$(docker run --rm "$BASE" python3 --version)"
fi

# ---- pip inside the build: the host's configuration ---------------------------------------------------------
# Index URLs and find-links as pip here sees them (its config files and PIP_* variables). Local
# directories and file:// URLs are served read-only on 127.0.0.1 for the build's duration (the build
# shares the host's network); other URLs pass through unchanged. The certificates pip here trusts (its
# `cert`, else the system's) that are neither public (pip's certifi) nor the system's packaged ones,
# such as a TLS-inspecting proxy's, go to the build's certificate store (EXTRA_CA_CERTS).
mkdir -p "$WORK/pip-sources"
mapfile -t PIP_ARGS < <("$PY" - "$WORK/pip-sources" "$PIP_PORT" "$WORK/extra-ca.pem" <<'EOF'
import glob, os, re, ssl, subprocess, sys
from urllib.parse import unquote, urlparse

served, port, extra_ca = sys.argv[1:4]
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
config = {}
for line in out.splitlines():          # `global.find-links='/opt/wheels'`; the install section wins
    m = re.match(r"^(global|install)\.([\w-]+)='(.*)'$", line)
    if m and (m[1] == "install" or m[2] not in config):
        config[m[2]] = m[3]
n = 0
def location(value: str) -> str:
    global n
    if "://" in value and not value.startswith("file:"):
        return value
    path = unquote(urlparse(value).path) if value.startswith("file:") else value
    path = os.path.abspath(path).rstrip("/")
    if not os.path.exists(path):
        return ""
    # The parent directory is served, so that an index's relative links (../../files/...) resolve.
    n += 1
    os.symlink(os.path.dirname(path), os.path.join(served, str(n)))
    return f"http://127.0.0.1:{port}/{n}/{os.path.basename(path)}"
for key in ("index-url", "extra-index-url", "find-links", "trusted-host"):
    env = "PIP_" + key.upper().replace("-", "_")
    values = os.environ.get(env, config.get(key, "")).split()
    if key != "trusted-host":
        values = [v for v in map(location, values) if v]
    if values:
        print(f"--build-arg={env}={' '.join(values)}")

PEM = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)
def certs(path):
    try:
        return PEM.findall(open(path, errors="replace").read())
    except OSError:
        return []
from pip._vendor import certifi
known = {re.sub(r"\s", "", c) for path in [certifi.where(), *glob.glob("/usr/share/ca-certificates/**/*.crt",
                                                                           recursive=True)] for c in certs(path)}
bundle = os.environ.get("PIP_CERT") or config.get("cert") or ssl.get_default_verify_paths().cafile or ""
extra = [c for c in certs(bundle) if re.sub(r"\s", "", c) not in known]
if extra:
    open(extra_ca, "w").write("\n".join(extra) + "\n")
    print("--build-arg=PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
EOF
)
if [ -s "$WORK/extra-ca.pem" ]; then
    echo "certificates for the build's pip: $(grep -c 'BEGIN CERTIFICATE' "$WORK/extra-ca.pem") of this machine's own"
    PIP_ARGS+=("--build-arg=EXTRA_CA_CERTS=$(cat "$WORK/extra-ca.pem")")
fi
if [ -n "$(ls -A "$WORK/pip-sources")" ]; then
    "$PY" - "$WORK/pip-sources" "$PIP_PORT" >"$WORK/pip-server.log" 2>&1 <<'EOF' &
import functools, http.server, sys

class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])),
                                functools.partial(Quiet, directory=sys.argv[1])).serve_forever()
EOF
    PIP_SERVER_PID=$!
    for _ in $(seq 50); do
        "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PIP_PORT/', timeout=1)" \
            2>/dev/null && break
        kill -0 "$PIP_SERVER_PID" 2>/dev/null || { cat "$WORK/pip-server.log"; fail "port $PIP_PORT: no server"; }
        sleep 0.2
    done
fi
shown=()
for arg in "${PIP_ARGS[@]}"; do
    case "$arg" in --build-arg=EXTRA_CA_CERTS=*) shown+=("--build-arg=EXTRA_CA_CERTS=<the certificates>") ;; *) shown+=("$arg") ;; esac
done
echo "pip in the build: ${shown[*]:-(nothing from this machine)}"

# ---- the image ----------------------------------------------------------------------------------------------
say "docker build --build-arg BASE_IMAGE=$BASE -t $IMAGE (log: $WORK/build.log, copied to /tmp/leanserve-image-test-build.log)"
cache=()
[ "${IMAGE_TEST_NO_CACHE:-0}" = 1 ] && cache=(--no-cache)
t=$(now)
if ! docker build --network host "${cache[@]}" --build-arg "BASE_IMAGE=$BASE" "${PIP_ARGS[@]}" -t "$IMAGE" . \
        >"$WORK/build.log" 2>&1; then
    cp "$WORK/build.log" /tmp/leanserve-image-test-build.log
    tail -40 "$WORK/build.log"
    fail "docker build failed (full log: /tmp/leanserve-image-test-build.log)"
fi
BUILD_S=$(since "$t")
cp "$WORK/build.log" /tmp/leanserve-image-test-build.log
[ -n "$PIP_SERVER_PID" ] && { kill "$PIP_SERVER_PID" 2>/dev/null || true; PIP_SERVER_PID=; }
grep -A12 'leanserve env --build-all' "$WORK/build.log" | grep -E '^(built|native kernels|cpu:)' || true
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")
echo "built in ${BUILD_S} s; image size $SIZE bytes ($(awk -v s="$SIZE" 'BEGIN { printf "%.0f MiB", s / 1048576 }'))"

# ---- run it ---------------------------------------------------------------------------------------------------
say "docker run --network host $IMAGE on 127.0.0.1:$PORT"
docker rm -f "$NAME" >/dev/null 2>&1 || true
# A long drain budget (default 30 s): the request in flight below must finish even on a busy machine.
t=$(now)
docker run -d --name "$NAME" --network host -e LEANSERVE_HOST=127.0.0.1 -e "LEANSERVE_PORT=$PORT" \
    -e LEANSERVE_SHUTDOWN_TIMEOUT=120 "$IMAGE" >/dev/null
RUN_S=$(since "$t")
t_started=$(now)
STARTED_AT=$(docker inspect -f '{{.State.StartedAt}}' "$NAME")
logs_fail() { docker logs "$NAME" 2>&1 | tail -30; fail "$*"; }

status=
while :; do
    status=$("$PY" - "$URL/health" <<'EOF' || true
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError:
    print("no answer")
EOF
)
    [ "$status" = 200 ] && break
    [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || logs_fail "the container exited before /health answered 200"
    awk -v a="$t" -v b="$(now)" -v d="$HEALTH_DEADLINE_S" 'BEGIN { exit !(b - a > d) }' \
        && logs_fail "/health did not answer 200 within $HEALTH_DEADLINE_S s (last: $status)"
    sleep 0.25
done
HEALTHY_S=$(since "$t")
echo "PASS /health: 200 after ${HEALTHY_S} s from docker run (docker run itself ${RUN_S} s, then $(since "$t_started") s)"

# ---- the official client --------------------------------------------------------------------------------------
"$PY" - "$URL" <<'EOF' || logs_fail "chat completion with the openai client"
import sys
import openai

client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0, timeout=120)
model = client.models.list().data[0].id
reply = client.chat.completions.create(model=model, temperature=0, max_tokens=24,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
text = reply.choices[0].message.content
assert text and text.strip(), f"empty reply: {reply}"
assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length"), reply
print(f"PASS chat completion (openai {openai.__version__}, model {model}): {text.strip()!r}, "
      f"{reply.usage.prompt_tokens}+{reply.usage.completion_tokens} tokens, {reply.choices[0].finish_reason}")
EOF

# ---- a non-root process ---------------------------------------------------------------------------------------
PID=$(docker inspect -f '{{.State.Pid}}' "$NAME")
SERVER_UID=$(awk '/^Uid:/ { print $2 }' "/proc/$PID/status")
CMDLINE=$(tr '\0' ' ' <"/proc/$PID/cmdline")
case "$CMDLINE" in *leanserve*serve*) ;; *) fail "the container's PID 1 is not the server: $CMDLINE" ;; esac
[ "$SERVER_UID" != 0 ] || fail "the server runs as root"
EXEC_UID=$(docker exec "$NAME" id -u)
[ "$EXEC_UID" != 0 ] || fail "the image's user is root (docker exec id -u)"
echo "PASS non-root: PID 1 ($CMDLINE) has UID $SERVER_UID; docker exec id -u: $EXEC_UID"

# ---- the kernels were built with the image --------------------------------------------------------------------
# The server loaded a native level, its log tells of no compile or failed load, the container's layer
# holds no changed kernel file (a compile at start would write the .so, its objects and build.ninja), and
# the loaded module's file is older than the container.
KERNELS=$("$PY" - "$URL/metrics" <<'EOF'
import re, sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
lines = [line for line in text.splitlines() if line.startswith("leanserve:kernels_info")]
print(lines[0] if lines else "")
EOF
)
echo "metrics: $KERNELS"
LEVEL=$(sed -n 's/.*executor="native (\([a-z0-9_]*\))".*/\1/p' <<<"$KERNELS")
[ -n "$LEVEL" ] || logs_fail "the server does not run the native kernels (leanserve:kernels_info: ${KERNELS:-none})"
if docker logs "$NAME" 2>&1 | grep -E 'built the native CPU kernels|native CPU kernels .* unavailable|removing .*lock'; then
    fail "the server's log shows a kernel build or a failed load at start"
fi
# (The loader's lock file comes and goes in each build directory: those directories show as changed.)
CHANGED=$(docker diff "$NAME" | awk '$2 ~ "^/opt/venv/kernels/" && $2 !~ "/lock$" \
    && !($1 == "C" && $2 ~ "^/opt/venv/kernels/leanserve_cpu_[a-z0-9_]+$")' || true)
[ -z "$CHANGED" ] || fail "the kernels changed in the running container:
$CHANGED"
SO=/opt/venv/kernels/leanserve_cpu_$LEVEL/leanserve_cpu_$LEVEL.so
SO_MTIME=$(docker exec "$NAME" stat -c %Y "$SO") || fail "$SO is not in the image"
START_EPOCH=$(date -d "$STARTED_AT" +%s)
[ "$SO_MTIME" -lt "$START_EPOCH" ] || fail "$SO is newer than the container's start"
LEVELS=$(docker exec "$NAME" sh -c 'ls -d /opt/venv/kernels/leanserve_cpu_*/ | xargs -n1 basename' | tr '\n' ' ')
echo "PASS kernels built at image build time: native $LEVEL loaded from $SO (built $(date -u -d "@$SO_MTIME" +%FT%TZ)," \
     "container started $STARTED_AT), no compile in the log, no kernel file changed; in the image: $LEVELS"

# ---- Docker's HEALTHCHECK --------------------------------------------------------------------------------------
for _ in $(seq 120); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
    [ "$health" = starting ] || break
    sleep 1
done
[ "$health" = healthy ] || logs_fail "docker's HEALTHCHECK says $health: $(docker inspect -f '{{json .State.Health}}' "$NAME")"
echo "PASS HEALTHCHECK: $health"

# ---- docker stop drains -------------------------------------------------------------------------------------------
# A streamed request is in flight when `docker stop` sends SIGTERM: it must finish whole, /health must say
# 503 meanwhile, and the server must log the drain and exit 0 before docker's SIGKILL (-t 150 s, past
# the server's 120 s drain budget).
"$PY" - "$URL" "$NAME" <<'EOF' || logs_fail "docker stop did not drain"
import subprocess, sys, time, urllib.error, urllib.request
import openai

url, name = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
model = client.models.list().data[0].id
stream = client.chat.completions.create(model=model, max_tokens=256, stream=True, temperature=0,
                                        extra_body={"ignore_eos": True},
                                        messages=[{"role": "user", "content": "Tell me a long story."}])
chunks, stop, during, finish, start = 0, None, None, None, time.monotonic()
try:
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if stop is None and chunks >= 2:
            stop = subprocess.Popen(["docker", "stop", "-t", "150", name], stdout=subprocess.DEVNULL)
            stopped_at = time.monotonic()
        if stop is not None and during is None and time.monotonic() - stopped_at > 0.5:
            try:
                during = urllib.request.urlopen(url + "/health", timeout=2).status
            except urllib.error.HTTPError as e:
                during = e.code
except openai.APIError as e:
    sys.exit(f"the request in flight failed after {chunks} chunks in {time.monotonic() - start:.1f} s"
             + (f", {time.monotonic() - stopped_at:.1f} s after docker stop" if stop else "")
             + f": {type(e).__name__}: {e}")
assert stop is not None, "the stream ended before docker stop was sent"
assert finish == "length" and chunks >= 200, f"the request in flight was cut: {chunks} chunks, finish {finish}"
drain_s = time.monotonic() - stopped_at
assert stop.wait(timeout=200) == 0, "docker stop failed"
print(f"in flight through the drain: {chunks} chunks, finish_reason {finish}, {drain_s:.1f} s after docker stop;"
      f" /health during the drain: {during}; docker stop returned after {time.monotonic() - stopped_at:.1f} s")
assert during in (503, None), f"/health answered {during} while draining"
EOF
EXIT_CODE=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
LOGS=$(docker logs "$NAME" 2>&1)
DRAIN=$(grep -E '"draining"|"drained"' <<<"$LOGS" || true)
echo "$DRAIN"
[ "$EXIT_CODE" = 0 ] || logs_fail "the container exited with $EXIT_CODE"
grep -q '"draining".*"in_flight": [1-9]' <<<"$LOGS" || logs_fail "no drain with a request in flight in the log"
grep -q '"drained".*"in_flight_left": 0' <<<"$LOGS" || logs_fail "the drain did not end with no request left"
echo "PASS docker stop: drained (a request in flight finished whole), exit code $EXIT_CODE"

say "image-test passed"
echo "base $BASE; build ${BUILD_S} s${DEBOOTSTRAP_S:+; debootstrap ${DEBOOTSTRAP_S} s}; first healthy response" \
     "${HEALTHY_S} s after docker run; image $IMAGE $SIZE bytes" \
     "($(awk -v s="$SIZE" 'BEGIN { printf "%.0f MiB", s / 1048576 }'))"
