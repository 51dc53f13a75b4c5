"""bench/sharded_bytes.py on the CPU: the bytes FSDP2 leaves on each rank, computed from the shapes and measured by
sharding a real quantized layer under a fake process group, agree; the ranks' pieces add up to the whole model.

A tiny custom shape keeps the measurement to seconds; the 70B / 65B run is an explicit invocation (the module's
docstring), not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench.llama_shapes import SHAPES, Shape  # noqa: E402
from bench.sharded_bytes import CATEGORIES, check, computed, main, parameters, parse_shape, unsharded  # noqa: E402

# 4 heads of 32, 2 KV heads; 352 = 5.5 blocks of 64 per row, so blocks straddle rows; widths that 3 does not divide
TINY = "128,352,2,4,2,520"


def test_70b_weights_are_llama2_70b_and_4_127_bits_each():
    s = SHAPES["70b"]
    params = parameters(s)
    # every weight of the model, from the rows FSDP2 splits: two 4-bit codes per packed byte, 16-bit tensors by bytes
    weights = sum(2 * p.rows * p.copies for p in params if p.name.endswith("base_packed"))
    dense = sum(p.total_bytes // 2 for p in params if p.category == "dense_16bit")
    assert weights + dense == 68_976_648_192  # Llama-2-70B's parameter count
    whole = unsharded(s)
    assert abs(8 * whole["base_4bit"] / weights - 4.127) < 1e-3  # NF4 + double quantization at block 64
    assert whole["adapters"] == 80 * 64 * 4 * sum(i + o for i, o in [(8192, 8192), (8192, 1024), (8192, 1024),
                                                                      (8192, 8192), (8192, 28672), (8192, 28672),
                                                                      (28672, 8192)])  # fmt: skip


def test_a_rank_holds_the_largest_torch_chunk_piece():
    s = parse_shape(TINY)
    for world in (1, 2, 3, 8):
        expected = sum(math.ceil(p.rows / world) * p.row_bytes * p.copies for p in parameters(s))
        assert computed(s, world)["total"] == expected
    # q_proj [128, 128]: 16384 codes in 8192 bytes (rows of 1 byte); of 3 ranks the first holds 2731 rows, x 2 layers
    q_packed = next(p for p in parameters(s) if p.name == "q_proj.base_packed")
    assert (q_packed.rows, q_packed.rank_bytes(3)) == (8192, 2731 * 2)
    # the embeddings [520, 128] in bf16: rows of 256 bytes, 174 of them on the first of 3 ranks
    embed = next(p for p in parameters(s) if p.name == "embed_tokens.weight")
    assert embed.rank_bytes(3) == 174 * 256


@pytest.mark.slow
def test_measured_equals_computed_and_the_pieces_cover_the_model(tmp_path, capsys):
    out = tmp_path / "bytes.json"
    worlds = [1, 2, 3, 8]
    assert main(["--shape", TINY, "--world-sizes", *map(str, worlds), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (model,) = report["models"]
    s = Shape(**model["shape"])
    whole = model["unsharded"]["total"]
    assert whole == unsharded(s)["total"] > 0
    # the bound on padding: each parameter's pieces are padded by less than one row per rank
    slack = sum(p.row_bytes * p.copies for p in parameters(s))
    previous = None
    for world in worlds:
        measured = model["measured"]["world_sizes"][str(world)]
        per_rank = measured["largest_rank"]["total"]
        assert measured["largest_rank"] == model["computed"][str(world)] == computed(s, world)
        assert measured["padded_per_rank"] == [per_rank] * world  # every rank allocates the largest piece
        assert measured["sum_over_ranks"]["total"] == whole
        assert 0 <= world * per_rank - whole < world * slack, world
        if world > 1:
            assert measured["smallest_rank"]["total"] <= per_rank
        if previous is not None:
            assert per_rank < previous  # more ranks, less on each
        previous = per_rank
    assert set(model["measured"]["world_sizes"]["2"]["largest_rank"]) == {*CATEGORIES, "total"}
    assert "measured (one real layer sharded" in capsys.readouterr().out

    # negative control: a measurement one byte off is refused, naming the world size
    tampered = copy.deepcopy(model["measured"])
    tampered["world_sizes"] = {int(k): v for k, v in tampered["world_sizes"].items()}
    check("custom", s, tampered)
    tampered["world_sizes"][3]["largest_rank"]["adapters"] += 1
    with pytest.raises(AssertionError, match="custom, 3 ranks"):
        check("custom", s, tampered)


def test_shape_option_takes_six_integers():
    assert parse_shape(TINY) == Shape(128, 352, 2, 4, 2, 520)
    with pytest.raises(argparse.ArgumentTypeError, match="six integers"):
        parse_shape("128,352,2")
    with pytest.raises(argparse.ArgumentTypeError, match="heads must divide"):
        parse_shape("128,352,2,3,1,520")
