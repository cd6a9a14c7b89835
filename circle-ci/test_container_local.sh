#!/usr/bin/env bash
# Build the unchanged Dockerfile with podman on a machine without a Docker engine or registry, then run the
# image read-only, as a non-root user, on the bundled demo dataset: --version, participant and group levels.
#   bash circle-ci/test_container_local.sh          (WORK=/tmp/clinicadl-app-container by default)
# The base image comes from debootstrap (Debian bookworm, as the Dockerfile's pinned base); this machine's
# TLS proxy CA and local CPU torch wheel reach pip through a pip.conf mounted during the build only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=$(cat "$ROOT/version")
IMAGE="localhost/clinicadl-app:$VERSION"
BASE=localhost/debian:bookworm-slim
WORK=${WORK:-/tmp/clinicadl-app-container}
export CONTAINERS_CONF="$ROOT/circle-ci/containers.conf"
mkdir -p "$WORK"
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "base image"
if ! podman image exists "$BASE"; then
  [ -x "$WORK/rootfs/bin/sh" ] || debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
  tar -C "$WORK/rootfs" -c . | podman import - "$BASE" >/dev/null
fi

step "build $IMAGE"
build=(--build-arg "BASE_IMAGE=$BASE" --build-arg "VERSION=$VERSION")
pipconf="$WORK/pip.conf"
printf '[global]\n' >"$pipconf"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  build+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/host-ca.crt:ro)
  printf 'cert = /etc/ssl/host-ca.crt\n' >>"$pipconf"
fi
if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  build+=(-v /opt/wheels:/opt/wheels:ro --build-arg TORCH_INDEX_URL=)
  printf 'find-links = /opt/wheels\n' >>"$pipconf"
fi
build+=(-v "$pipconf:/etc/pip.conf:ro")
podman build "${build[@]}" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }

run() { podman run --rm --read-only --user 1000:1000 "$@"; }

step "version"
expected=$(cd "$ROOT" && python3 -c "print('clinicadl-app', open('version').read().strip())")
got=$(run "$IMAGE" --version)
[ "$got" = "$expected" ] || { echo "image says '$got', run.py says '$expected'"; exit 1; }
[ "$(run --entrypoint id "$IMAGE" -u)" = 1000 ] || { echo "the image must run as a non-root user"; exit 1; }

step "participant level, read-only"
rm -rf "$WORK/out" "$WORK/work" "$WORK/caps"
mkdir -p "$WORK/out" "$WORK/work"
chmod a+rwx "$WORK/out" "$WORK/work"
# one participant of each sex, preprocessed at once (one registration each, the two CPUs in use)
subjects=(IXI132HH1415 IXI174HH1571)
run -v "$ROOT/demo/bids:/bids:ro" -v "$WORK/out:/out" -v "$WORK/work:/work" "$IMAGE" \
  /bids /out participant --participant_label "${subjects[@]}" --n_cpus 2 -w /work --modes image
for subject in "${subjects[@]}"; do
  test -s "$WORK/out/caps/subjects/sub-$subject/ses-M000/deeplearning_prepare_data/image_based/t1_linear/sub-${subject}_ses-M000_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w.pt"
  test -s "$WORK/out/reports/sub-$subject.html"
done
python3 - "$WORK/out/dataset_description.json" "$VERSION" <<'PY'
import json, sys
generated = json.load(open(sys.argv[1]))["GeneratedBy"][0]
assert generated["Version"] == sys.argv[2], generated
assert generated["Container"]["Tag"] == f"clinicadl-app:{sys.argv[2]}", generated
PY

step "group level, read-only"
# on the t1-linear images of the twelve demo participants at 2 mm (tests/data/caps2mm, a copy the image may write
# tensors into): the stages in the image are what this step proves; the participant level above made the CAPS
# format, and registering ten more participants here would triple this test's time
mkdir -p "$WORK/caps/subjects"
cp -rL "$ROOT/tests/data/caps2mm/subjects/sub-IXI"* "$WORK/caps/subjects/"
chmod -R a+rwX "$WORK/caps"
cat >"$WORK/experiment.toml" <<'TOML'
[labels]
column = "sex"
values = ["F", "M"]
[split]
n_test = 2
n_splits = 0
n_validation = 2
max_attempts = 10
[train]
epochs = 1
batch_size = 2
[interpret]
methods = ["gradients"]
TOML
run -v "$ROOT/demo/bids:/bids:ro" -v "$WORK/out:/out" -v "$WORK/work:/work" -v "$WORK/caps:/caps" \
  -v "$WORK/experiment.toml:/experiment.toml:ro" \
  "$IMAGE" /bids /out group --config /experiment.toml --caps_dir /caps --n_cpus 2 -w /work
maps="$WORK/out/maps/sex_F_M_image_Conv5_FC3"
for file in maps.json environment.txt report.html groups/train+validation.tsv split-0/best-loss/model.pth.tar \
            split-0/best-loss/test/test_image_level_metrics.tsv; do
  test -s "$maps/$file" || { echo "missing $maps/$file"; exit 1; }
done
test "$(tail -n +2 "$maps/groups/train+validation.tsv" | wc -l)" -eq 10 || { echo "train+validation is not 10 images"; exit 1; }
grep -q "container docker clinicadl-app:$VERSION" "$maps/environment.txt"
grep -q "^allocator mimalloc" "$maps/environment.txt" || { echo "the image did not train with mimalloc"; exit 1; }

step "the outputs are a valid BIDS derivative"
run --entrypoint bids-validator-deno -v "$WORK/out:/out:ro" -e DENO_DIR=/tmp/deno --tmpfs /tmp "$IMAGE" /out --format json \
  >"$WORK/validator.json" || true
python3 - "$WORK/validator.json" <<'PY'
import json, sys
issues = json.load(open(sys.argv[1]))["issues"]["issues"]
errors = [i for i in issues if i["severity"] == "error"]
assert not errors, errors
PY
step "passed"
