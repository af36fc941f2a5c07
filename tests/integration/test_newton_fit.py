"""The federated Newton fit of the linear head through the coordinator's code
(:class:`server.advice_step.NewtonFit`) against sites behind a fake grid: the
fit equals the pooled one, the prior is chosen on validation, and hostile sums
are excluded without ending the fit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from server.identity import SiteIdentities
from server.newton_fit import NewtonFit
from server.run_folder import StrategyState
from server.strategy import GroupedStrategy
from shared_model.clinical import REGIMENS
from shared_model.federation_config import FederationConfig
from shared_model.messages import RoundRequest
from shared_model.model import build_model
from shared_model.model_config import ModelConfig
from shared_model.newton_messages import NewtonReply
from shared_model.parameter_groups import parameter_groups
from shared_model.plan import PRESET_PLANS
from shared_model.posterior import (
    fit_pooled,
    glm_sums,
    linear_predictor,
    with_intercept,
)
from wire.records import newton_reply_content, read_newton_query

SITES = {100: "alpha", 101: "bravo", 102: "charlie"}


@dataclass
class Data:
    z: np.ndarray
    regimen: np.ndarray
    y: np.ndarray


def _model() -> Any:
    cfg = ModelConfig.from_plan(PRESET_PLANS["tiny"])
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "head": "linear", "expert_hidden": 0})
    return build_model(cfg)


def _world(d: int, seed: int) -> tuple[dict[str, Data], dict[str, Data]]:
    rng = np.random.default_rng(seed)
    beta = rng.normal(scale=0.3, size=(4, d + 1))
    beta[0, -1] = 0

    def draw(n: int) -> Data:
        z = rng.normal(size=(n, d))
        a = rng.integers(0, 3, size=n)
        eta = linear_predictor(with_intercept(z), a, beta)
        return Data(z, a, (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float))

    train = {s: draw(n) for s, n in zip(SITES.values(), (80, 120, 60), strict=True)}
    val = {s: draw(20) for s in SITES.values()}
    return train, val


class NewtonGrid:
    """Three sites answering Newton queries from their own patients; a
    ``hostile`` site replies with what ``corrupt`` makes of its honest reply."""

    def __init__(
        self,
        train: dict[str, Data],
        val: dict[str, Data],
        features: int,
        hostile: str | None = None,
        corrupt: Any = None,
    ) -> None:
        self.train, self.val, self.features = train, val, features
        self.hostile, self.corrupt = hostile, corrupt

    def get_node_ids(self) -> list[int]:
        return list(SITES)

    def get_nodes(self) -> list[Any]:
        return []

    def send_and_receive(self, messages: list[Message], *, timeout: float) -> list:
        out = []
        for msg in messages:
            site = SITES[msg.metadata.dst_node_id]
            _, _, beta = read_newton_query(msg)
            t, v = self.train[site], self.val[site]
            sums = [glm_sums(t.z, t.regimen, t.y, b) for b in beta]
            vs = [glm_sums(v.z, v.regimen, v.y, b) for b in beta]
            reply = NewtonReply(
                site,
                sums[0].n,
                np.array([s.loglik for s in sums]),
                np.stack([s.grad for s in sums]),
                np.stack([s.hess for s in sums]),
                len(v.y),
                np.array([x.loglik for x in vs]),
                len(t.y),
                np.zeros(self.features),
                np.ones(self.features) * len(t.y),
                {r: int((t.regimen == j).sum()) for j, r in enumerate(REGIMENS)},
                np.stack([x.grad for x in vs]),
                np.stack([x.hess for x in vs]),
            )
            if site == self.hostile:
                reply = self.corrupt(reply)
            answer = Message(newton_reply_content(reply), reply_to=msg)
            answer.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            out.append(answer)
        return out


def _fit(
    grid: NewtonGrid, model: Any, priors: str = "0.3 3 30", bound: float = 4.0
) -> tuple[Any, dict[str, Any], NewtonFit]:
    fed = FederationConfig(
        min_sites=2,
        head_type="linear",
        head_fit="newton",
        prior_grid=priors,
        newton_rounds=30,
        update_bound=bound,
    )
    strategy = GroupedStrategy(fed, parameter_groups(model))
    declared = {s: {"shared": 200} for s in SITES.values()}  # round 1's
    strategy.restore(StrategyState(declared=declared))
    identities = SiteIdentities(dict(SITES), "simulation")
    request = RoundRequest(
        fed.to_run_config(),
        PRESET_PLANS["tiny"].to_dict(),
        model.config.to_dict(),
    )
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    fit = NewtonFit(grid, fed, strategy, lambda: identities, 1, model)  # type: ignore[arg-type]
    posterior, record = fit.fit(request, arrays, model.config)
    return posterior, record, fit


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Messages built in-process need a task identity (tests/conftest.py)."""


def test_the_federated_fit_is_the_pooled_fit_and_the_prior_is_chosen_on_validation() -> (
    None
):
    model = _model()
    d = model.glm_coefficients().shape[1] - 1
    train, val = _world(d, 0)
    posterior, record, _ = _fit(NewtonGrid(train, val, model.n_features), model)
    assert record["converged"] and record["sites"] == sorted(SITES.values())
    losses = {p["lam"]: p["validation_log_loss"] for p in record["priors"]}
    assert record["lam"] == min(losses, key=lambda lam: losses[lam])
    every = [
        np.concatenate([getattr(train[s], k) for s in train])
        for k in ("z", "regimen", "y")
    ]
    pooled, _ = fit_pooled(*every, lam=record["lam"], tol=1e-12)
    assert np.max(np.abs(posterior.mean - pooled.mean)) < 1e-6
    assert np.max(np.abs(posterior.cov - pooled.cov)) < 1e-6
    # the validation log-loss it chose by, recomputed on pooled validation data
    vz, va, vy = (
        np.concatenate([getattr(val[s], k) for s in val]) for k in ("z", "regimen", "y")
    )
    again = -glm_sums(vz, va, vy, posterior.mean).loglik / len(vy)
    assert again == pytest.approx(losses[record["lam"]], rel=1e-6)
    assert record["expert_support"] == {
        r: int(sum((train[s].regimen == j).sum() for s in train))
        for j, r in enumerate(REGIMENS)
    }


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda r: _replace(r, hess=-r.hess), "positive semi-definite"),
        (lambda r: _replace(r, hess=r.hess * np.nan), "NaN"),
        (lambda r: _replace(r, grad=r.grad[:, :3]), "shape"),
        (lambda r: _replace(r, loglik=-r.loglik), "log-likelihood"),
        (lambda r: _replace(r, feature_n=500), "declared"),
        (
            lambda r: _replace(r, hess=r.hess + np.triu(np.ones_like(r.hess[0]), 1)),
            "symmetric",
        ),
    ],
)
def test_a_hostile_site_is_left_out_and_the_fit_goes_on(
    corrupt: Any, reason: str
) -> None:
    model = _model()
    d = model.glm_coefficients().shape[1] - 1
    train, val = _world(d, 1)
    grid = NewtonGrid(train, val, model.n_features, hostile="charlie", corrupt=corrupt)
    posterior, record, _ = _fit(grid, model, priors="1")
    assert record["sites"] == ["alpha", "bravo"] and "charlie" in record["excluded"]
    assert reason in record["excluded"]["charlie"]
    honest = {s: train[s] for s in ("alpha", "bravo")}
    every = [
        np.concatenate([getattr(honest[s], k) for s in honest])
        for k in ("z", "regimen", "y")
    ]
    pooled, _ = fit_pooled(*every, lam=1.0, tol=1e-12)
    assert np.max(np.abs(posterior.mean - pooled.mean)) < 1e-6


def _replace(reply: NewtonReply, **change: Any) -> NewtonReply:
    from dataclasses import replace

    return replace(reply, **change)


def test_recalibration_through_the_grid_matches_a_pooled_platt_fit() -> None:
    """The recalibration's Newton steps on the sites' validation sums give the
    slope and intercept a logistic regression of the validation outcomes on
    the head's logit finds (sklearn, pooled)."""
    from sklearn.linear_model import LogisticRegression

    model = _model()
    d = model.glm_coefficients().shape[1] - 1
    train, val = _world(d, 2)
    grid = NewtonGrid(train, val, model.n_features)
    posterior, _, fit = _fit(grid, model, priors="0.01")  # over-confident
    fed = FederationConfig(min_sites=2, newton_rounds=30)
    request = RoundRequest(
        fed.to_run_config(), PRESET_PLANS["tiny"].to_dict(), model.config.to_dict()
    )
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    slope, shift, record = fit.calibrate(request, arrays, posterior.mean)
    assert record["converged"]
    vz, va, vy = (
        np.concatenate([getattr(val[s], k) for s in val]) for k in ("z", "regimen", "y")
    )
    eta = linear_predictor(with_intercept(vz), va, posterior.mean)
    ref = LogisticRegression(C=1e12, max_iter=10000, tol=1e-12).fit(eta[:, None], vy)
    assert slope == pytest.approx(ref.coef_[0, 0], rel=1e-4)
    assert shift == pytest.approx(ref.intercept_[0], abs=1e-4)
    assert slope < 1  # the over-confident head is flattened


def test_a_site_inflating_its_sums_is_held_to_the_bound() -> None:
    """Sums a hundred times a site's patients' (a weight it could give itself)
    are scaled to the honest majority's per-patient size, as an update is."""
    model = _model()
    d = model.glm_coefficients().shape[1] - 1
    train, val = _world(d, 3)

    def inflate(r: NewtonReply) -> NewtonReply:
        return _replace(
            r, grad=r.grad * 100, hess=r.hess * 100, val_hess=r.val_hess * 100
        )

    honest, _, _ = _fit(NewtonGrid(train, val, model.n_features), model, priors="1")
    hostile = NewtonGrid(train, val, model.n_features, "charlie", inflate)
    bounded, record, _ = _fit(hostile, model, priors="1")
    unbounded, _, _ = _fit(hostile, model, priors="1", bound=0.0)
    # scaled back to at most update-bound (4) times its own patients' weight
    assert 0 < record["bounded"]["charlie"] * 100 <= 4 * 1.5
    assert "alpha" not in record["bounded"] and "bravo" not in record["bounded"]
    assert record["converged"]  # the scaled site's weight settles
    gap = np.abs(bounded.mean - honest.mean).max()
    assert gap < 0.75 * np.abs(unbounded.mean - honest.mean).max()


def test_a_gradient_out_of_proportion_is_clipped_and_held_in_the_prior_ball() -> None:
    """A site inflating only its gradient (its Hessian honest) would steer the
    unbounded Newton steps anywhere: measured 1.5e5 from the honest fit before
    the ball. Its gradient is clipped, the coefficients stay in the ball that
    holds every honest mode, the fit says it did not settle, and the advice
    step then declines to switch anyone."""
    from server.advice_step import _choose_rule
    from shared_model.posterior import prior_precision

    model = _model()
    d = model.glm_coefficients().shape[1] - 1
    train, val = _world(d, 3)
    honest, honest_record, _ = _fit(
        NewtonGrid(train, val, model.n_features), model, priors="1"
    )
    assert honest_record["clipped"] == {} and honest_record["converged"]

    def steer(r: NewtonReply) -> NewtonReply:
        return _replace(r, grad=r.grad * 100)

    hostile = NewtonGrid(train, val, model.n_features, "charlie", steer)
    bounded, record, _ = _fit(hostile, model, priors="1")
    assert record["clipped"].get("charlie", 0) > 0
    assert "alpha" not in record["clipped"] and "bravo" not in record["clipped"]
    precision = prior_precision(model.glm_coefficients().shape[1], 1.0)
    b = bounded.mean.ravel()
    assert float(b @ (precision * b)) <= 2 * record["patients"] * np.log(2) * (1 + 1e-9)
    assert not record["converged"]
    fed = FederationConfig(head_type="linear", head_fit="newton")
    outcome: dict[str, Any] = {"fit": record}
    rule = _choose_rule(
        None,  # type: ignore[arg-type]  (declining sends nothing)
        fed,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        {},
        bounded,
        tuple(REGIMENS),
        lambda: None,  # type: ignore[arg-type,return-value]
        2,
        outcome,
    )
    assert rule.kind == "fixed" and rule.reference == "TNT"
    assert "did not converge" in outcome["declined"]
