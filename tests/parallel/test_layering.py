"""Dependency direction: skiparse is a leaf, parallel never imports models, the model never creates a group."""
import json
import subprocess
import sys
import textwrap


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_parallel_imports_nothing_from_models():
    mods = _run("""
        import json, sys
        import osp_megatron.parallel, osp_megatron.parallel.tp_shards
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("osp_megatron"))))
    """)
    assert "osp_megatron.parallel.plan" in mods and "osp_megatron.skiparse" in mods
    assert not [m for m in mods if m.startswith("osp_megatron.models")], mods


def test_skiparse_is_a_leaf():
    mods = _run("""
        import json, sys
        import osp_megatron.skiparse
        print(json.dumps(sorted(m for m in sys.modules if m.startswith(("osp_megatron", "megatron")))))
    """)
    assert mods and all(m == "osp_megatron" or m.startswith("osp_megatron.skiparse") for m in mods), mods


def test_build_model_never_creates_a_process_group():
    out = _run("""
        import json
        import torch.distributed as dist
        from osp_megatron.config import ModelConfig
        from osp_megatron.models import build_model
        try:
            build_model(ModelConfig(size="tiny"))
            err = ""
        except ValueError as exc:
            err = str(exc)
        print(json.dumps({"error": err, "initialized": dist.is_initialized()}))
    """)
    assert "ParallelState.single()" in out["error"] and not out["initialized"]


def test_trainers_take_groups_from_the_injected_parallel_state():
    """The trainers read ranks, sizes and groups from the `ParallelState` that `initialize_parallel` returned,
    never from megatron's global `parallel_state` getters (rng.py only asks whether megatron is initialised)."""
    import ast
    from pathlib import Path

    import osp_megatron

    root = Path(osp_megatron.__file__).parent
    calls = []
    for path in sorted([*root.glob("training/*.py"), *root.glob("rl/*.py"), *root.glob("cli/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in ("parallel_state", "mps") and node.attr != "model_parallel_is_initialized"):
                calls.append(f"{path.relative_to(root)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not calls, calls
