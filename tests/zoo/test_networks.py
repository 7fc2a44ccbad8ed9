"""Real torchvision and timm networks of every short-path pattern through export + check + graph surgery.

Each network (random weights made realistic, tests/zoo/networks.py) is exported once; the correct export must pass
with the architecture's count of short paths per kind, each named at its block; then each surgery of
tests/zoo/onnx_surgery.py breaks one block's skip and the check must fail naming that block first, except the
operand swap, which must pass.
"""

from __future__ import annotations

import onnx
import pytest

from tests.zoo import onnx_surgery
from tests.zoo.networks import NETWORKS, expected_blocks, export_network, network

pytestmark = pytest.mark.zoo
# Network by network, the correct export first: the export is cached for the cases that follow it.
CASES = [(net.id, case) for net in NETWORKS for case in ("correct", *net.surgeries)]


@pytest.fixture(scope="module")
def exported(zoo_stack, zoo_images, tmp_path_factory):
    """``exported(net_id)`` -> (net, model, onnx path, proto, images, blocks, trace), exported and traced once; only
    the last network stays cached (CASES runs network by network)."""
    import torch

    from resdeploy.export import trace_short_paths

    cache: dict[str, tuple] = {}

    def get(net_id: str) -> tuple:
        if net_id not in cache:
            cache.clear()
            net = network(net_id)
            x = zoo_images(8)
            model, report, _ = export_network(net, tmp_path_factory.mktemp(net_id), x)
            assert report and report.parity.max_rel_err <= 1e-4, str(report)
            trace = trace_short_paths(model, torch.from_numpy(x[:1]))
            cache[net_id] = (net, model, report.path, onnx.load(str(report.path)), x, expected_blocks(net, model), trace)
        return cache[net_id]

    return get


def _correct_export_passes(net, model, path, x, blocks) -> None:  # noqa: ANN001
    """The architecture's count of short paths per kind, each at its block, outputs and operands as PyTorch's."""
    from resdeploy.export import check_short_paths

    report = check_short_paths(path, model, x[:2])
    assert report, str(report)
    data = report.to_dict()
    assert {k: v for k, v in data["kinds"].items() if v} == net.kinds, str(report)
    assert data["residual_adds"] == net.kinds.get("add", 0)
    assert [r.block for r in report.rows] == blocks, str(report)
    assert all(r.status == "ok" and r.rel_err is not None and r.rel_err < 1e-4 for r in report.rows), str(report)
    assert all(r.operand_rel_err is not None and r.operand_rel_err < 1e-4 for r in report.rows), str(report)


@pytest.mark.parametrize("net_id,case", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_network(exported, net_id, case):
    """``correct``: the export passes. A surgery: the check fails naming the broken block first (``swapped``:
    the operands in the other order, which must pass)."""
    from resdeploy.export import check_short_paths

    net, model, path, proto, x, blocks, trace = exported(net_id)
    if case == "correct":
        _correct_export_passes(net, model, path, x, blocks)
        return
    block, earlier = onnx_surgery.target_block(blocks, proto)
    # Against the module's trace, made once per network: what the check would trace from ``model`` each time.
    report = check_short_paths(onnx_surgery.apply(case, proto, block, earlier), trace, x[:2])
    if case == "swapped":
        assert report, str(report)
        return
    assert not report, f"{case} of {block} passed:\n{report}"
    assert report.defects[0].block == block, f"{case} of {block}:\n{report}"
