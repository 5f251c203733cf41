"""Lesson 10's discrete diffusion core: D3PM transition matrices, masked diffusion and the MDLM objective."""
import math

import pytest
import torch

from course_lib import discrete as D


@pytest.mark.parametrize("kind", ["uniform", "absorbing"])
def test_transition_matrices_are_stochastic_and_their_closed_form_is_the_product_of_the_steps(kind):
    k, mask_id = 7, 6
    betas = torch.linspace(0.02, 0.3, 12, dtype=torch.float64)
    make = (lambda b: D.uniform_transition(k, b)) if kind == "uniform" else (lambda b: D.absorbing_transition(k, b, mask_id))
    mats = [make(float(b)) for b in betas]
    for q in mats:
        assert (q >= 0).all() and torch.allclose(q.sum(1), torch.ones(k, dtype=torch.float64))
    alpha_bar = float(torch.prod(1 - betas))
    closed = D.uniform_marginal(k, alpha_bar) if kind == "uniform" else D.absorbing_marginal(k, alpha_bar, mask_id)
    assert torch.allclose(D.cumulative(mats), closed, atol=1e-12)
    if kind == "absorbing":  # [MASK] is absorbing: its row stays put
        assert torch.equal(closed[mask_id], torch.nn.functional.one_hot(torch.tensor(mask_id), k).double())
    with pytest.raises(ValueError, match="mask_id"):
        D.absorbing_transition(k, 0.1, k)
    with pytest.raises(ValueError, match="beta"):
        D.uniform_transition(k, 1.5)


@pytest.mark.parametrize("schedule", D.SCHEDULES)
def test_masking_marginals_by_monte_carlo(schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 9, (4000, 16), generator=g)
    for t in (0.0, 0.2, 0.5, 0.9, 1.0):
        xt = D.mask_tokens(x0, t, mask_id=9, schedule=schedule, generator=g)
        share = (xt == 9).double().mean().item()
        want = 1 - D.alpha(t, schedule).item()
        assert abs(share - want) < 4 * math.sqrt(want * (1 - want) / x0.numel()) + 1e-12  # 4 standard errors
        assert torch.equal(xt[xt != 9], x0[xt != 9])  # unmasked tokens are the data's
    keep = torch.zeros_like(x0, dtype=torch.bool)
    keep[:, :3] = True
    xt = D.mask_tokens(x0, 1.0, 9, generator=g, keep=keep)
    assert torch.equal(xt[:, :3], x0[:, :3]) and (xt[:, 3:] == 9).all()


@pytest.mark.parametrize("schedule", D.SCHEDULES)
def test_mdlm_loss_averaged_over_time_is_the_exact_nll_of_a_context_free_model(schedule):
    # a model that ignores x_t: factorised logits per position. The continuous-time ELBO is then tight:
    # E_t E_mask[w(t) sum_masked CE] = integral of -alpha'(t) dt * sum CE = sum_l -log p_l(x0_l) exactly
    g = torch.Generator().manual_seed(1)
    k, length, mask_id = 6, 5, 5
    logits = torch.randn(length, k, generator=g, dtype=torch.float64)
    logits[:, mask_id] = -1e9  # the model never predicts [MASK]
    x0 = torch.randint(0, k - 1, (1, length), generator=g)
    exact = torch.nn.functional.cross_entropy(logits, x0[0], reduction="sum").item()
    n = 200_000
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # stratified times in (0, 1)
    xs = x0.expand(n, length)
    xt = D.mask_tokens(xs, t, mask_id, schedule, generator=g)
    per = D.mdlm_loss(logits.expand(n, length, k), xs, xt, t, mask_id, schedule)
    se = per.std().item() / math.sqrt(n)
    assert abs(per.mean().item() - exact) < 4 * se + 1e-3
    # without the weight the average is not the likelihood (it would be half of it for the linear schedule)
    unweighted = (per / D.mdlm_weight(t, schedule)).mean().item()
    assert abs(unweighted - exact) > 0.2 * exact


def test_mdlm_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="must match"):
        D.mdlm_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), 0.5, 3)
    with pytest.raises(TypeError, match="integer"):
        D.mask_tokens(torch.zeros(2, 3), 0.5, 1)


def test_the_token_transformer_is_causal_or_bidirectional_as_configured():
    from course_lib.nets import TokenTransformer, build_model

    torch.manual_seed(0)
    x = torch.randint(0, 20, (3, 9))
    later = x.clone()
    later[:, 5:] = torch.randint(0, 20, (3, 4))  # change only positions 5..8
    for causal in (True, False):
        net = TokenTransformer(20, 9, dim=32, depth=2, heads=4, causal=causal).eval()
        with torch.no_grad():
            a, b = net(x), net(later)
        assert a.shape == (3, 9, 20)
        moved = (a[:, :5] - b[:, :5]).abs().max().item()
        # causal: positions before 5 never see the change; bidirectional: they do
        assert (moved < 1e-5) if causal else (moved > 1e-3)
        rebuilt = build_model(net.config)
        rebuilt.load_state_dict(net.state_dict())
        with torch.no_grad():
            assert torch.allclose(rebuilt.eval()(x), a, atol=1e-6)
    with pytest.raises(ValueError, match="token ids"):
        net(torch.full((1, 3), 20))
