"""Pickles are never trusted: malicious files are refused before any of their code runs.

The project's own weights are safetensors (no code in the format). Pickled files it reads, the official
MDETR ``.pth`` checkpoints and the RefCOCO ``refs(*).p`` annotations, go through ``torch.load(
weights_only=True)`` with an allow-list, or an unpickler that refuses every class. Each malicious file
below would create a marker file if it were unpickled normally; the test checks that it is refused and
that the marker never appears.
"""

import ast
import builtins
import io
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from mdetr.checkpoints.official import load_official_state_dict, read_official_checkpoint
from mdetr.data.errors import DataError
from mdetr.data.refcoco import read_refs
from mdetr.engine.checkpoint import save_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src" / "mdetr"


class _Payload:
    """Unpickling calls ``function(*args)``: what a malicious checkpoint hides in its pickle."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _gadgets(marker: Path) -> dict[str, _Payload]:
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
        "builtins.exec": _Payload(builtins.exec, touch),
        "builtins.eval": _Payload(builtins.eval, touch),
    }


def _checkpoint_with(payload, where: str) -> dict:
    weights = {"query_embed.weight": torch.zeros(2, 4)}
    if where == "top":
        return payload  # the whole file is the payload
    if where == "args":
        return {"model": weights, "args": payload, "epoch": 3}
    if where == "state_dict":
        return {"model": {**weights, "transformer.evil": payload}}
    return {"model": weights, "optimizer": {"state": {0: {"exp_avg": payload}}}}  # nested deep


@pytest.mark.parametrize("where", ["top", "args", "state_dict", "optimizer"])
@pytest.mark.parametrize("gadget", ["os.system", "subprocess.Popen", "builtins.exec", "builtins.eval"])
def test_malicious_pth_is_refused_and_never_runs(tmp_path, gadget, where):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save(_checkpoint_with(_gadgets(marker)[gadget], where), path)
    with pytest.raises(Exception) as err:
        load_official_state_dict(path)
    assert type(err.value).__name__ == "CheckpointError"
    message = str(err.value)
    assert f"refusing to load {path}" in message and "nothing in the file was executed" in message
    assert gadget.split(".")[-1] in message or gadget.split(".")[-1].lower() in message.lower()
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_legacy_pickle_format_is_refused_too(tmp_path, protocol):
    """A plain pickle (not torch's zip container), as older torch versions wrote."""
    marker = tmp_path / "executed"
    path = tmp_path / "legacy.pth"
    path.write_bytes(pickle.dumps({"model": _gadgets(marker)["os.system"]}, protocol=protocol))
    with pytest.raises(Exception, match="refusing|cannot read") as err:
        read_official_checkpoint(path)
    assert type(err.value).__name__ == "CheckpointError"
    assert not marker.exists()


def test_benign_official_file_still_loads(tmp_path):
    """The allow-list is not "refuse everything": tensors, containers and argparse.Namespace load."""
    import argparse

    path = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.arange(3.0)}, "args": argparse.Namespace(lr=1e-4), "epoch": 2}, path)
    read = read_official_checkpoint(path)
    assert (torch.equal(read.state_dict["w"], torch.arange(3.0)) and read.args == {"lr": 1e-4}
            and read.epoch == 2)


def test_malicious_refcoco_refs_pickle_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "sentences": _gadgets(marker)["os.system"]}], protocol=2))
    with pytest.raises(DataError, match=r"refusing to load (posix|os|nt)\.system"):
        read_refs(path)
    assert not marker.exists()


def test_own_checkpoints_hold_no_pickle(tmp_path):
    save_checkpoint(tmp_path / "ck", model=nn.Linear(2, 2), config={}, optimizer=torch.optim.SGD(
        nn.Linear(2, 2).parameters(), lr=0.1), state={"epoch": 0})
    for file in (tmp_path / "ck").iterdir():
        head = file.read_bytes()[:2]
        assert file.suffix in (".safetensors", ".json"), file
        assert head not in (b"\x80\x02", b"\x80\x04", b"\x80\x05", b"PK"), file  # pickle or torch zip


def _calls(tree: ast.AST, dotted: str):
    module, name = dotted.rsplit(".", 1)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module:
            yield node


def test_every_unpickling_call_in_the_package_is_restricted():
    """Static check: ``torch.load`` always passes ``weights_only=True``; no bare ``pickle.load(s)``
    (the refs reader subclasses ``pickle.Unpickler`` with a ``find_class`` that refuses every class)."""
    loads = 0
    for file in SRC.rglob("*.py"):
        tree = ast.parse(file.read_text(), filename=str(file))
        for call in _calls(tree, "torch.load"):
            loads += 1
            flags = {k.arg: k.value for k in call.keywords}
            assert (isinstance(flags.get("weights_only"), ast.Constant)
                    and flags["weights_only"].value is True), \
                f"{file}:{call.lineno} calls torch.load without weights_only=True"
        for name in ("pickle.load", "pickle.loads"):
            assert not list(_calls(tree, name)), f"{file} calls {name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                ast.unparse(b) == "pickle.Unpickler" for b in node.bases
            ):
                methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
                assert "find_class" in methods, f"{file}: {node.name} must restrict find_class"
    assert loads >= 1  # the scan does see the package's torch.load calls


def test_restricted_unpickler_refuses_what_the_scan_allows():
    from mdetr.data.refcoco import _PlainUnpickler

    data = pickle.dumps({"plain": [1, "two", 3.0]}, protocol=2)
    assert _PlainUnpickler(io.BytesIO(data)).load() == {"plain": [1, "two", 3.0]}
    with pytest.raises(pickle.UnpicklingError):
        _PlainUnpickler(io.BytesIO(pickle.dumps(_Payload(print, "x"), protocol=2))).load()
