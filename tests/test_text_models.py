"""Lesson 10's text models: the exact corpus denoiser against Bayes' rule by enumeration, the samplers (no [MASK] left,
prompts kept, exact sampling at one token per step), the autoregressive likelihood normalised over every sequence, the
masked-diffusion bound tight for the exact denoiser, and both families training through the one loop."""
import itertools
import math

import pytest
import torch

from course_lib import text_models as tm
from course_lib.captions import MASK_ID, PAD_ID, VOCAB_SIZE, caption_corpus, decode, is_valid
from course_lib.discrete import corpus_denoiser, subs_log_probs
from course_lib.nets import TokenTransformer
from course_lib.train import Trainer, preset


def small_corpus():
    """Four short rows of caption tokens, with counts 1, 2, 3, 4 (so the posterior is not uniform)."""
    rows = torch.tensor([[1, 20, 2, 0], [1, 21, 2, 0], [1, 20, 3, 4], [1, 22, 3, 4]])
    return rows.repeat_interleave(torch.tensor([1, 2, 3, 4]), 0), rows, torch.tensor([1, 2, 3, 4.0], dtype=torch.float64)


def test_corpus_denoiser_is_bayes_rule_by_enumeration():
    corpus, rows, counts = small_corpus()
    d = corpus_denoiser(corpus, VOCAB_SIZE, MASK_ID)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        r = int(torch.randint(4, (1,), generator=g))
        xt = rows[r].clone()
        xt[torch.rand(4, generator=g) < 0.6] = MASK_ID
        got = d(xt[None])[0]
        want = torch.zeros(4, VOCAB_SIZE, dtype=torch.float64)
        agree = [j for j in range(4) if all(xt[i] in (MASK_ID, rows[j, i]) for i in range(4))]
        for j in agree:
            for i in range(4):
                want[i, rows[j, i]] += counts[j] / sum(counts[a] for a in agree)
        torch.testing.assert_close(got, want, atol=1e-7, rtol=0)  # M e^-20: the disagreeing rows
    # a row no corpus row agrees with gets the rows that disagree least (here: one mismatch, rows 0 and 2 tie ... )
    probs = d(torch.tensor([[1, 23, 2, 0]]))[0]
    assert probs[1, 20] + probs[1, 21] == pytest.approx(1.0) and probs[1, 21] == pytest.approx(2 / 3)


def test_one_token_per_step_samples_the_corpus_exactly():
    corpus, rows, counts = small_corpus()
    n = 4000
    x = tm.sample_masked(tm.ExactDenoiser(corpus), n, steps=4, order="random", seed=1)
    index = {tuple(r): j for j, r in enumerate(rows.tolist())}
    assert all(tuple(r) in index for r in x.tolist())  # never a row outside the data: exact, not approximate
    freq = torch.bincount(torch.tensor([index[tuple(r)] for r in x.tolist()]), minlength=4).double() / n
    p = counts.double() / counts.sum()
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt()).all()  # 4 standard errors of a share of 4,000


def test_parallel_decoding_invents_rows_even_with_the_exact_denoiser():
    corpus, rows, _ = small_corpus()
    x = tm.sample_masked(tm.ExactDenoiser(corpus), 2000, steps=1, order="random", seed=2)
    outside = sum(tuple(r) not in set(map(tuple, rows.tolist())) for r in x.tolist()) / len(x)
    # one step draws the 4 positions independently from their marginals: P(in corpus) is sum_j prod_i p_i(row_j)
    marg = [torch.bincount(corpus[:, i], minlength=VOCAB_SIZE).double() / len(corpus) for i in range(4)]
    inside = sum(math.prod(float(marg[i][r[i]]) for i in range(4)) for r in rows.tolist())
    assert outside == pytest.approx(1 - inside, abs=4 * math.sqrt(inside * (1 - inside) / 2000))


@pytest.mark.parametrize("order", tm.ORDERS)
@pytest.mark.parametrize("steps", [1, 3, 10, 25])
def test_samplers_never_return_a_mask_and_keep_the_prompt(order, steps):
    torch.manual_seed(0)
    net = TokenTransformer(VOCAB_SIZE, 10, dim=16, depth=1, heads=2).eval()
    x = tm.sample_masked(net, 64, steps, order, seed=3)
    assert x.shape == (64, 10) and not (x == MASK_ID).any() and ((x >= 0) & (x < MASK_ID)).all()
    prompt = caption_corpus(64, "test", seed=0)[0]
    prompt[:, 2:5] = MASK_ID
    filled = tm.sample_masked(net, steps=steps, order=order, seed=3, prompt=prompt)
    keep = prompt != MASK_ID
    assert torch.equal(filled[keep], prompt[keep]) and not (filled == MASK_ID).any()
    ar = tm.sample_autoregressive(TokenTransformer(VOCAB_SIZE, 10, dim=16, depth=1, heads=2, causal=True).eval(),
                                  prompt=prompt, seed=3)
    assert torch.equal(ar[keep], prompt[keep]) and not (ar == MASK_ID).any()


def test_confidence_order_reveals_the_surest_tokens_first():
    corpus, rows, counts = small_corpus()
    seen = {}
    for order in ("confidence", "random"):
        net, inputs = tm.ExactDenoiser(corpus), []
        net.register_forward_hook(lambda mod, args, out: inputs.append(args[0].clone()))
        tm.sample_masked(net, 500, steps=4, order=order, seed=4)
        seen[order] = inputs[1]  # the rows after the first step: one token revealed in each
    # position 0 is token 1 in every caption (probability 1): the confidence order reveals it first, in every row;
    # the random order reveals it first in about a quarter of the rows
    assert ((seen["confidence"] != MASK_ID).sum(1) == 1).all()
    assert (seen["confidence"][:, 0] == 1).all()
    assert 0.15 < float((seen["random"][:, 0] != MASK_ID).double().mean()) < 0.35


def test_return_steps_says_when_each_position_was_drawn():
    corpus, rows, counts = small_corpus()
    net, inputs = tm.ExactDenoiser(corpus), []
    net.register_forward_hook(lambda mod, args, out: inputs.append(args[0].clone()))
    prompt = corpus[:300].clone()
    prompt[:, 1:] = MASK_ID
    x, at = tm.sample_masked(net, steps=3, order="confidence", seed=5, prompt=prompt, return_steps=True)
    assert torch.equal(x, tm.sample_masked(tm.ExactDenoiser(corpus), steps=3, order="confidence", seed=5, prompt=prompt))
    assert (at[:, 0] == -1).all() and ((at[:, 1:] >= 0) & (at[:, 1:] < 3)).all()  # the prompt's token was given
    after = inputs[1:] + [x]
    for k, (before, now) in enumerate(zip(inputs, after)):  # step k changes exactly the positions it reports
        assert torch.equal(before != now, at == k)
    # one token per step in random order: every row's steps are a permutation
    x, at = tm.sample_masked(net, 200, steps=4, order="random", seed=6, return_steps=True)
    assert (at.sort(1).values == torch.arange(4)).all()


def test_the_ancestral_sampler_draws_each_position_at_a_uniform_step():
    # linear schedule: a token still masked at step k is revealed with probability 1 / (steps - k), so its step is
    # uniform over the steps, independently of the other positions (collisions are common: MDLM, sec. 3.3)
    corpus, _, _ = small_corpus()
    n, steps = 2000, 5
    _, at = tm.sample_masked(tm.ExactDenoiser(corpus), n, steps=steps, order="ancestral", seed=7, return_steps=True)
    share = torch.bincount(at.flatten(), minlength=steps).double() / at.numel()
    assert ((share - 1 / steps).abs() <= 4 * math.sqrt(0.2 * 0.8 / at.numel())).all()
    together = (at[:, :, None] == at[:, None, :]).sum(-1) > 1  # drawn in the same step as another position
    p_alone = (1 - 1 / steps) ** 3
    assert float(together.double().mean()) == pytest.approx(1 - p_alone, abs=4 * math.sqrt(p_alone * (1 - p_alone) / n))


def test_autoregressive_probabilities_sum_to_one_over_every_sequence():
    torch.manual_seed(1)
    net = TokenTransformer(VOCAB_SIZE, 3, dim=16, depth=2, heads=2, causal=True).eval()
    every = torch.tensor(list(itertools.product(range(MASK_ID), repeat=3)))  # 24^3 sequences, [MASK] excluded
    with torch.no_grad():
        total = torch.exp(-tm.autoregressive_nll(net, every)).sum()
    assert float(total) == pytest.approx(1.0, abs=1e-4)


def test_autoregressive_nll_is_the_sum_of_next_token_log_probabilities():
    torch.manual_seed(2)
    net = TokenTransformer(VOCAB_SIZE, 10, dim=16, depth=1, heads=2, causal=True).eval()
    x = caption_corpus(5, "train", seed=1)[0]
    with torch.no_grad():
        nll = tm.autoregressive_nll(net, x)
        for row, got in zip(x, nll):
            want = 0.0
            for i in range(10):  # one causal pass per prefix, independently of shift_right
                inp = torch.cat([torch.tensor([MASK_ID]), row[:i]])[None]
                want -= float(subs_log_probs(net(inp)[:, -1], MASK_ID)[0, row[i]])
            assert float(got) == pytest.approx(want, abs=1e-4)


def test_the_bound_of_the_exact_denoiser_is_the_data_nll():
    # masked diffusion's ELBO is tight when the denoiser is exact (it averages the any-order autoregressive
    # factorisations, each equal to log p(x)): the estimate matches -log(count / M) up to Monte Carlo error
    corpus, _ = caption_corpus(60, "train", seed=5)
    rows, counts = torch.unique(corpus, dim=0, return_counts=True)
    true = -(counts.double() / len(corpus)).log()
    diff = tm.masked_bound(tm.ExactDenoiser(corpus), rows, n_t=512, seed=0) - true
    se = diff.std() / math.sqrt(len(diff))
    assert abs(float(diff.mean())) < 4 * float(se) + 1e-3
    # a worse denoiser (of a different corpus, smoothed) has a larger bound on the same rows
    other = torch.cat([corpus, caption_corpus(200, "train", seed=6)[0]])
    assert float(tm.masked_bound(tm.ExactDenoiser(other), rows, n_t=64, seed=0).mean()) > float(true.mean()) + 0.5


# the smallest budgets that clear the bar with a margin over seeds 0-2 (last-20 / first-10 loss: masked 0.42-0.49
# at 150 steps of 128, autoregressive 0.31 at 80 steps of 64); the masked loss, drawn at a random t, needs more
@pytest.mark.parametrize("name, steps, batch", [("captions_mdlm", 150, 128), ("captions_ar", 80, 64)])
def test_the_text_families_train_through_the_one_loop(name, steps, batch):
    trainer = Trainer(preset(name, steps=steps, warmup=10, batch_size=batch))
    start = sum(trainer.train(10, progress=False).losses) / 10
    trainer.train(progress=False)
    assert sum(trainer.losses[-20:]) / 20 < 0.6 * start  # from ~ln 24 nats per token to the grammar's structure
    assert trainer.model.config["causal"] == (name == "captions_ar")


def test_text_families_refuse_other_data_and_networks():
    with pytest.raises(ValueError, match="captions"):
        preset("captions_mdlm", data="ring8")
    with pytest.raises(ValueError, match="token_transformer"):
        preset("captions_ar", model={"kind": "mlp"})
    with pytest.raises(ValueError, match="masking"):
        preset("captions_mdlm", masking="cubic")


def test_sampler_arguments_are_checked():
    net = TokenTransformer(VOCAB_SIZE, 10, dim=16, depth=1, heads=2).eval()
    with pytest.raises(ValueError, match="order"):
        tm.sample_masked(net, 4, 2, order="left")
    with pytest.raises(ValueError, match="steps"):
        tm.sample_masked(net, 4, 0)
    with pytest.raises(TypeError, match="integer token ids"):
        tm.autoregressive_nll(net, torch.zeros(2, 10))
    with pytest.raises(ValueError, match="MASK"):
        tm.autoregressive_nll(net, torch.full((2, 10), MASK_ID))


def test_decode_and_validity_of_generated_rows():
    x, texts = caption_corpus(3, "test", seed=0)
    assert decode(x) == texts and all(map(is_valid, texts))
    x[0, 3] = PAD_ID  # a word after padding: not a caption
    assert decode(x)[0] is None and not is_valid(decode(x)[0])


def test_the_shipped_text_models_write_valid_captions_and_their_bound_is_near_the_ar_nll():
    mdlm, ar = tm.load_text_model("captions_mdlm"), tm.load_text_model("captions_ar")
    from course_lib.captions import text_quality

    # 400 captions: a true validity of 0.99 falls below 0.95 with probability < 1e-4
    assert text_quality(tm.generate(mdlm, 400, steps=10, seed=5))["validity"] >= 0.95
    assert text_quality(tm.generate(ar, 400, seed=5))["validity"] >= 0.95
    test = caption_corpus(300, "test", seed=2)[0]
    md_bits, ar_bits = tm.nll_bits(mdlm, test, n_t=32), tm.nll_bits(ar, test)
    assert 0.5 < ar_bits < 1.5 and md_bits < 1.2 * ar_bits  # ~1.05 bits per token each (bench text)
    with pytest.raises(ValueError, match="not a text model"):
        tm.load_text_model(str(__import__("course_lib.checkpoints", fromlist=["x"]).shipped_dir() / "ring8.pt"))


def test_bench_text_quick_records_and_verdict():
    from course_lib.bench.text import bench_text, table, verdict

    records = bench_text(quick=True, samples=60)
    sample = [r for r in records if r["kind"] == "sample"]
    assert {"model", "steps", "validity", "distinct", "bits_per_token", "seconds"} <= set(sample[0])
    exact = [r for r in sample if r["model"] == "exact corpus denoiser" and r["steps"] == 10]
    assert exact and all(r["validity"] == 1.0 for r in exact)  # one token per step from the exact denoiser: exact
    assert {r["kind"] for r in records} == {"sample", "nll", "nll_gap", "infill"}
    assert all({"model", "steps", "validity", "distinct", "bits_per_token", "seconds"} <= set(r) for r in records)
    lines = verdict(records)
    assert "bits per token" in "\n".join(lines) and "validity" in table(records)
    assert not any("target" in line or " met" in line for line in lines)  # sentences about the models, not a status
    gap = next(r for r in records if r["kind"] == "nll_gap")
    z = abs(gap["bits_per_token"]) / gap["stderr"]
    assert ("no gap" in lines[1]) == (z < 2)


def test_the_bound_equals_its_exact_time_integral_on_a_toy():
    # For the linear schedule the time integral has a closed form per masking pattern m of the L tokens:
    # int_0^1 (1/t) t^|m| (1 - t)^(L - |m|) dt = B(|m|, L - |m| + 1), so the negative ELBO is exactly
    # sum_m B(|m|, L - |m| + 1) sum_{i in m} -log p(x0_i | x_m): enumerated here, estimated by masked_bound.
    torch.manual_seed(3)
    net = TokenTransformer(VOCAB_SIZE, 3, dim=16, depth=1, heads=2).eval()
    x0 = torch.tensor([[1, 20, 2]])
    exact = 0.0
    with torch.no_grad():
        for pattern in itertools.product([False, True], repeat=3):
            m = torch.tensor(pattern)
            if not m.any():
                continue
            xt = torch.where(m, torch.tensor(MASK_ID), x0[0])[None]
            logp = subs_log_probs(net(xt), MASK_ID)[0]
            k = int(m.sum())
            beta = math.gamma(k) * math.gamma(3 - k + 1) / math.gamma(3 + 1)
            exact += beta * float(-logp[m, x0[0][m]].sum())
        estimates = tm.masked_bound(net, x0.repeat(400, 1), n_t=500, seed=1)  # standard error ~0.025 nats
    se = float(estimates.std()) / math.sqrt(len(estimates))
    assert float(estimates.mean()) == pytest.approx(exact, abs=4 * se)


def test_the_default_is_one_step_per_token_to_fill():
    corpus, rows, _ = small_corpus()
    net = tm.ExactDenoiser(corpus)
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    tm.sample_masked(net, 50, seed=0)
    assert len(calls) == 4  # four positions, four calls
    prompt = rows[:2].clone()
    prompt[:, 1] = MASK_ID
    calls.clear()
    tm.sample_masked(net, prompt=prompt, seed=0)
    assert len(calls) == 1
