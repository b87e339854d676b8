"""Build material in every run folder: spec, on-device script (run against a stand-in trtexec),
golden data (checked with polygraphy on ONNX Runtime), engine keys, and the "not built" path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.files import sha256_path
from export import trt_build

# A stand-in for trtexec with the output lines build_engine.sh reads (as TensorRT 10.3 prints them
# on an Orin): it records its arguments, notes whether a timing cache was handed in, writes the
# engine and the cache.
FAKE_TRTEXEC = r"""#!/usr/bin/env bash
if [ "$1" = --help ]; then echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --help"; exit 0; fi
printf '%s\n' "$@" > "$FAKE_DIR/args.txt"
for a in "$@"; do
  case "$a" in --saveEngine=*) engine="${a#--saveEngine=}";; --timingCacheFile=*) cache="${a#--timingCacheFile=}";; esac
done
[ -f "$cache" ] && echo reused > "$FAKE_DIR/cache_was_there" || rm -f "$FAKE_DIR/cache_was_there"
echo "[I] Selected Device: Orin"
echo "[I] Compute Capability: ${FAKE_CC:-8.7}"
echo "[I] TensorRT version: 10.3.0"
printf 'plan' > "$engine"; printf 'cache' > "$cache"
echo "&&&& PASSED TensorRT.trtexec"
"""


@pytest.fixture()
def device(tmp_path, deploy_run):
    """A copy of the run folder as pulled onto a device, with trtexec and nvidia-smi stand-ins."""
    run_dir = tmp_path / "run"
    shutil.copytree(deploy_run, run_dir)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text(FAKE_TRTEXEC)
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho ' 8.7'\n")
    for tool in ("trtexec", "nvidia-smi"):
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    return run_dir, env, tmp_path


def _build(run_dir: Path, env: dict, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(run_dir / "build" / "build_engine.sh")], env={**env, **extra},
                          capture_output=True, text=True, timeout=60)


def test_engine_key():
    assert trt_build.engine_key("10.3.0", "8.7") == "trt10.3.0-sm87"
    assert trt_build.engine_key("11.4.0.106", "12.0") == "trt11.4.0.106-sm120"


def _spec(**over) -> dict:
    graphs = [{"name": "model", "onnx": {"path": "../my model.onnx", "sha256": "ab" * 32},
               "golden": trt_build.golden("model", True)},
              {"name": "decode", "onnx": {"path": "../decode.onnx", "sha256": "cd" * 32},
               "golden": trt_build.golden("decode", False)}]
    spec = {"target": "jetson-orin-jp6", "tensorrt": "10.3.0", "compute_capability": "8.7", "strongly_typed": True,
            "precision_flags": [], "sparsity": True, "workspace_mib": 512, "builder_optimization_level": 4,
            "graphs": graphs, "tolerance": {"atol": 0.001, "rtol": 0.05}}
    return {**spec, **over}


@pytest.mark.parametrize("over, flags, cc", [
    ({}, "--stronglyTyped --sparsity=enable --memPoolSize=workspace:512 --builderOptimizationLevel=4 --skipInference",
     "8.7"),
    ({"tensorrt": "8.5.2", "strongly_typed": False, "precision_flags": ["--fp16", "--int8"], "sparsity": False,
      "compute_capability": None},
     "--fp16 --int8 --memPoolSize=workspace:512 --skipInference", "any"),
])
def test_build_script_renders_the_spec(tmp_path, over, flags, cc):
    spec = _spec(**over)
    script = trt_build.build_script(spec)
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and "@{" not in script
    assert f"# from build_spec.json; target jetson-orin-jp6, TensorRT {spec['tensorrt']}, compute capability {cc})." \
        in lines
    assert {"NAMES=(model decode)", "ONNX=('../my model.onnx' ../decode.onnx)", f"ONNX_SHA256=({'ab' * 32} {'cd' * 32})",
            "GOLDEN_INPUTS=(golden/inputs.json golden/decode/inputs.json)", f"FLAGS=({flags})"} <= set(lines)
    assert f'case "$trt" in {spec["tensorrt"]}*) ;; *) echo "warning: build_spec.json targets TensorRT ' \
           f'{spec["tensorrt"]}, this is $trt" >&2;; esac' in lines
    assert f'[ "{cc}" = any ] || [ "$cc" = "{cc}" ] || echo "warning: build_spec.json targets compute capability ' \
           f'{cc}, this is $cc" >&2' in lines
    assert '  "$TRTEXEC" --onnx="${ONNX[i]}" "${FLAGS[@]}" --saveEngine="$stage/$plan" ' \
           '--timingCacheFile="$stage/timing.cache" \\' in lines
    assert '      --load-outputs "${GOLDEN_OUTPUTS[i]}" --atol 0.001 --rtol 0.05 \\' in lines
    path = tmp_path / "build_engine.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_build_spec_in_the_run_folder(deploy_run):
    spec = json.loads((deploy_run / "build" / "build_spec.json").read_text())
    m = json.loads((deploy_run / "manifest.json").read_text())
    assert spec["target"] == "jetson-orin-jp6" and spec["tensorrt"] == "10.3.0" and spec["compute_capability"] == "8.7"
    assert spec["schema"] == "edgeprune-trt-build/2" and len(spec["graphs"]) == 1
    graph = spec["graphs"][0]
    assert graph["name"] == "model" and graph["golden"] == {"inputs": trt_build.GOLDEN_INPUTS,
                                                             "outputs": trt_build.GOLDEN_OUTPUTS}
    assert graph["onnx"] == {"path": "../model.onnx", "sha256": sha256_path(deploy_run / "model.onnx"),
                             "external_data": None}
    assert graph["inputs"] == m["onnx"]["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [2, 16]},
                                                      {"name": "attention_mask", "dtype": "int64", "shape": [2, 16]}]
    assert spec["strongly_typed"] is True and spec["workspace_mib"] == 1024
    # every Linear of the tiny BERT was pruned 2:4 (2 layers x 6 Linears), so sparse tactics are on
    assert spec["sparsity"] is True and spec["sparse_layers"] == 12 == m["onnx"]["tensorrt"]["sparse_2_4_layers"]
    assert spec["timing_cache"] == "engines/{key}/timing.cache" and graph["engine"] == "engines/{key}/model.plan"
    assert graph["trtexec"] == ["trtexec", "--onnx=../model.onnx", "--stronglyTyped", "--sparsity=enable",
                               "--memPoolSize=workspace:1024", "--builderOptimizationLevel=3", "--skipInference",
                               "--saveEngine=engines/{key}/model.plan", "--timingCacheFile=engines/{key}/timing.cache"]


def test_no_engine_built_here_is_said_plainly(deploy_run):
    reason = trt_build.unavailable()
    if reason is None:
        pytest.skip("this machine can build TensorRT engines")
    m = json.loads((deploy_run / "manifest.json").read_text())
    assert m["onnx"]["tensorrt"]["build"]["engine"] == {"built": False, "reason": reason}
    assert not (deploy_run / "build" / "engines").exists()
    report = (deploy_run / "report.md").read_text()
    assert f"not built here: {reason}. On the device run build/build_engine.sh" in report


def test_build_script_builds_under_the_device_key(device):
    run_dir, env, fake = device
    assert subprocess.run(["bash", "-n", str(run_dir / "build" / "build_engine.sh")]).returncode == 0
    done = _build(run_dir, env)
    assert done.returncode == 0, done.stderr
    key_dir = run_dir / "build" / "engines" / "trt10.3.0-sm87"
    assert (key_dir / "model.plan").read_text() == "plan" and (key_dir / "timing.cache").is_file()
    info = json.loads((key_dir / "engine.json").read_text())
    assert info["tensorrt"] == "10.3.0" and info["compute_capability"] == "8.7" and info["gpu"] == "Orin"
    assert info["engines"] == [{"name": "model", "plan": "model.plan", "onnx_sha256": sha256_path(run_dir / "model.onnx"),
                                "sha256": sha256_path(key_dir / "model.plan")}]
    assert info["target"] == "jetson-orin-jp6"
    spec = json.loads((run_dir / "build" / "build_spec.json").read_text())
    stage_args = (fake / "args.txt").read_text().split()
    assert stage_args[0] == "--onnx=../model.onnx" and stage_args[1:6] == spec["graphs"][0]["trtexec"][2:7]
    assert "polygraphy not found: skipped comparing" in done.stderr
    assert not list((run_dir / "build" / "engines").glob(".building-*"))
    # a rebuild on the same device starts from that key's timing cache
    assert _build(run_dir, env).returncode == 0 and (fake / "cache_was_there").is_file()


def test_build_script_refuses_a_mismatched_device_or_onnx(device):
    run_dir, env, _ = device
    done = _build(run_dir, env, FAKE_CC="9.0")  # trtexec reports another GPU than the probe
    assert done.returncode == 2 and "on compute capability 9.0, expected 10.3.0 / 8.7" in done.stderr
    assert list((run_dir / "build" / "engines").iterdir()) == []
    with open(run_dir / "model.onnx", "ab") as f:
        f.write(b"\0")
    done = _build(run_dir, env)
    assert done.returncode == 2 and "does not match build_spec.json (sha256)" in done.stderr


def test_golden_data_checks_out_with_polygraphy(deploy_run, tmp_path):
    """The device compares its engine with these files; here polygraphy compares ONNX Runtime with them."""
    build = deploy_run / "build"
    polygraphy = shutil.which("polygraphy", path=os.path.dirname(sys.executable))
    done = subprocess.run([polygraphy, "run", str(deploy_run / "model.onnx"), "--onnxrt",
                           "--load-inputs", str(build / trt_build.GOLDEN_INPUTS),
                           "--load-outputs", str(build / trt_build.GOLDEN_OUTPUTS), "--atol", "1e-5", "--rtol", "1e-5"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PASSED" in done.stdout
