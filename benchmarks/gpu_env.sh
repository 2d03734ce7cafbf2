# Source this on the GPU machine (no network, no setuptools in its Python) before running
# jaxpp there:  source benchmarks/gpu_env.sh && python3 benchmarks/pipeline_vs_jit.py ...
# It carries wheels from .whl/ (if any) and makes jaxpp importable as a package tree of links
# (the top-level folders are subpackages, see setup.py). Use `python3 -m jaxpp.cli` for the CLI,
# from outside the repository root (there `-m` would import ./jaxpp, which lacks the subpackages).
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  rm -rf /tmp/site  # a second install into a kept target fails on a warm machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "gpu_env.sh: wheel install failed" >&2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
rm -rf /tmp/pp && mkdir -p /tmp/pp/jaxpp && cp -r jaxpp/. /tmp/pp/jaxpp/
for sub in schedules runtime kernels; do ln -s "$PWD/$sub" "/tmp/pp/jaxpp/$sub"; done
export PYTHONPATH=/tmp/pp${PYTHONPATH:+:$PYTHONPATH}
