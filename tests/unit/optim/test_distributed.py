"""The collectives every decision goes through, on 2 CPU processes (gloo), and their single-process behaviour."""

from __future__ import annotations

import torch

from lightning_twophase.optim.distributed import (
    DecisionReducer,
    all_reduce_sum_,
    broadcast_,
    is_distributed,
    reduce_decision_scalars,
)
from tests.conftest import init_gloo, run_on_ranks


def test_without_a_process_group_everything_is_the_identity():
    assert not is_distributed()
    means, sums = torch.tensor([1.0, 2.0]), torch.tensor([3.0])
    assert reduce_decision_scalars(means, sums) == (means, sums)
    tensors = [torch.ones(2), torch.zeros(3, dtype=torch.float64)]
    all_reduce_sum_(tensors)
    broadcast_(tensors)
    assert torch.equal(tensors[0], torch.ones(2)) and torch.equal(tensors[1], torch.zeros(3, dtype=torch.float64))
    reducer = DecisionReducer(sharded=True)
    assert reducer.mean(torch.tensor(2.5)) == 2.5
    assert torch.equal(reducer.dots(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))


def _rank(rank: int, world_size: int) -> dict:
    init_gloo(rank, world_size)
    value = float(rank + 1)  # 1 on rank 0, 2 on rank 1
    means, sums = reduce_decision_scalars(torch.tensor([value, 10 * value]), torch.tensor([value]))
    tensors = [torch.full((2,), value), torch.full((3,), value, dtype=torch.float64)]
    all_reduce_sum_(tensors)
    broadcast_sources = [torch.full((2,), value), torch.full((1,), value, dtype=torch.float64)]
    broadcast_(broadcast_sources)
    return {
        "means": means,
        "sums": sums,
        "all_reduced": tensors,
        "broadcast": broadcast_sources,
        "mean_loss": DecisionReducer().mean(torch.tensor(value)),
        "replicated_dots": DecisionReducer(sharded=False).dots(torch.tensor([value])),
        "sharded_dots": DecisionReducer(sharded=True).dots(torch.tensor([value])),
    }


def test_reductions_agree_on_every_rank():
    rank0, rank1 = run_on_ranks(_rank)
    for result in (rank0, rank1):
        assert torch.equal(result["means"], torch.tensor([1.5, 15.0]))
        assert torch.equal(result["sums"], torch.tensor([3.0]))
        assert torch.equal(result["all_reduced"][0], torch.full((2,), 3.0))
        assert torch.equal(result["all_reduced"][1], torch.full((3,), 3.0, dtype=torch.float64))
        assert torch.equal(result["broadcast"][0], torch.full((2,), 1.0))  # rank 0's values everywhere
        assert torch.equal(result["broadcast"][1], torch.full((1,), 1.0, dtype=torch.float64))
        assert result["mean_loss"] == 1.5
        assert torch.equal(result["sharded_dots"], torch.tensor([3.0]))
    # Replicated parameters: the dot products are already global, nothing is reduced.
    assert torch.equal(rank0["replicated_dots"], torch.tensor([1.0]))
    assert torch.equal(rank1["replicated_dots"], torch.tensor([2.0]))
