"""GPU checks (run with `make test-all` on a CUDA machine; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from client.training.engine import TrainConfig, evaluate, train_local
from shared_model.loss import MoELoss
from shared_model.model import build_model
from shared_model.model_config import ModelConfig
from tests.unit.test_engine import CFG, Toy

pytestmark = pytest.mark.gpu


def test_mixed_precision_training_on_cuda_learns() -> None:
    torch.manual_seed(0)
    model = build_model(CFG)
    data = Toy(8)
    dev = torch.device("cuda")
    first = train_local(
        model,
        data,
        TrainConfig(max_steps=2, augment=False, amp=True, optimizer="adamw", lr=3e-3),
        device=dev,
    )
    last = train_local(
        model,
        data,
        TrainConfig(max_steps=40, augment=False, amp=True, optimizer="adamw", lr=3e-3),
        device=dev,
    )
    assert torch.isfinite(torch.tensor(last.loss)) and last.loss < first.loss
    assert next(model.parameters()).device.type == "cuda"
    assert evaluate(model, data, device=dev).metrics["dice"] > 0.5


def test_opacus_per_sample_gradients_on_cuda() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(**CFG.to_dict())
    dev = torch.device("cuda")
    model = build_model(cfg).double().to(dev).train()
    data = Toy(3)
    batch = {
        k: torch.stack([data[i][k] for i in range(3)]).to(dev)
        for k in ("image", "label", "clinical", "regimen", "pcr")
    }
    for k in ("image", "label", "clinical", "pcr"):
        batch[k] = batch[k].double()
    loss_fn = MoELoss()
    ref = {n: [] for n, _ in model.named_parameters()}
    for i in range(3):
        model.zero_grad()
        out = model(
            batch["image"][i : i + 1],
            batch["clinical"][i : i + 1],
            batch["regimen"][i : i + 1],
        )
        loss_fn(out, batch["label"][i : i + 1], batch["pcr"][i : i + 1])[0].backward()
        for n, p in model.named_parameters():
            ref[n].append(p.grad.detach().clone())
    gsm = GradSampleModule(
        model, batch_first=True, loss_reduction="mean", force_functorch=True
    )
    loss_fn(
        gsm(batch["image"], batch["clinical"], batch["regimen"]),
        batch["label"],
        batch["pcr"],
    )[0].backward()
    num = den = 0.0
    for n, p in gsm._module.named_parameters():
        expected = torch.stack(ref[n])
        num += float((p.grad_sample - expected).pow(2).sum())
        den += float(expected.pow(2).sum())
    assert (num / den) ** 0.5 < 1e-9
    gsm._close()


def test_dp_training_on_cuda_draws_its_noise_there() -> None:
    """opacus draws the noise on the parameters' device with the generator it
    is given: a CPU generator fails there, the site's generator is on CUDA."""
    from client.privacy.dp_sgd import PrivateRound, dp_generator
    from client.privacy.rounds import DPRound

    torch.manual_seed(0)
    model = build_model(ModelConfig(**CFG.to_dict()))
    dev = torch.device("cuda")
    generator = dp_generator(3, dev)
    assert generator.device.type == "cuda"
    before = [p.detach().clone() for p in model.parameters()]
    result = train_local(
        model,
        Toy(8),
        TrainConfig(augment=False, optimizer="adamw", lr=1e-3),
        device=dev,
        dp=PrivateRound(DPRound(1.0, 1.0, 0.5, 2, 8), generator, secure_mode=False),
    )
    assert result.steps == 2
    moved = [
        not torch.equal(a, b.cpu())
        for a, b in zip(before, model.parameters(), strict=True)
    ]
    assert any(moved) and next(model.parameters()).device.type == "cuda"
