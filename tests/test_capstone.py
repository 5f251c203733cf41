"""The capstone's kit: the learner's attention inside the UNet, the parts' checks, the training loop calling the
learner's step, and the judge reading real images (statistically, on 200 prompts)."""
import pytest
import torch

from course_lib import capstone as C
from course_lib.exercises.capstone import ref_caption_step, ref_text_to_shapes
from course_lib.exercises.lesson7 import ref_cross_attention


@pytest.fixture(scope="module")
def kit():
    return C.Kit()


def test_the_learners_attention_computes_what_torchs_does_inside_the_unet(kit):
    from course_lib.nets.cross_attention import use_attention

    net = C.network(None, kit, seed=3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape))  # the zero-initialised output projections too
    x, t = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,))
    context, mask = kit.condition(["a red circle", "a small blue square at the top left", "", "a green cross"])
    fused = net(x, t, context=context, mask=mask)
    calls = []
    assert use_attention(net, lambda *a: calls.append(1) or ref_cross_attention(*a)) > 0
    mine = net(x, t, context=context, mask=mask)
    assert calls and torch.allclose(fused, mine, atol=1e-5)
    mine.square().mean().backward()  # gradients reach the weights through the learner's function
    assert all(p.grad is not None for n, p in net.named_parameters() if ".q." in n or n.endswith("q.weight"))
    with pytest.raises(TypeError):
        use_attention(net, "not a function")


def test_parts_come_as_a_dict_or_a_function_and_bad_ones_are_refused():
    parts = C.as_parts(ref_text_to_shapes)
    assert parts.train_step is ref_caption_step
    with pytest.raises(ValueError, match="missing sample_loop"):
        C.as_parts({"cross_attention": ref_cross_attention, "train_step": ref_caption_step})
    with pytest.raises(TypeError):
        C.as_parts({"cross_attention": 1, "train_step": 2, "sample_loop": 3})


def test_training_runs_the_learners_step_with_their_attention(kit):
    seen = {"attention": 0, "steps": 0}

    def attention(*args):
        seen["attention"] += 1
        return ref_cross_attention(*args)

    def step(*args):
        seen["steps"] += 1
        return ref_caption_step(*args)

    parts = {"cross_attention": attention, "train_step": step, "sample_loop": ref_text_to_shapes()["sample_loop"]}
    net, losses = C.train(parts, 3, kit, n_train=64, progress=False)
    assert seen["steps"] == 3 and seen["attention"] >= 3 and len(losses) == 3
    z = C.generate(net, parts["sample_loop"], ["a red circle", "a blue cross"], kit, nfe=2)
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()
    with pytest.raises(TypeError, match="train_step returned str"):
        C.train({**parts, "train_step": lambda *a: "low"}, 1, kit, n_train=64, progress=False)


def test_the_judge_reads_real_images_as_their_prompts_and_shuffled_ones_near_chance(kit):
    """Real test images (encoded, as a sampler would return latents) with their own captions: colour and shape right
    for nearly all of 200; with the captions shuffled, 'both' falls to about chance (1/24, standard error 0.014)."""
    from course_lib.attributes import dataset
    from course_lib.autoencoder import encode

    images, captions, _ = dataset(400, "test", 7)
    one = [i for i, c in enumerate(captions) if " at the " in c][:200]
    latents = encode(kit.ae, images[one]) * kit.scale_factor
    prompts = [captions[i] for i in one]
    right = C.judge(latents, prompts, kit)
    assert right["colour"] > 0.95 and right["shape"] > 0.9 and right["both"] > 0.85
    shuffled = [prompts[i] for i in torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0))]
    assert C.judge(latents, shuffled, kit)["both"] < right["chance"] + 5 * 0.015


def test_parts_that_swap_in_the_library_are_refused_by_check():
    """A sampler part that calls the course's own sampler (or its guidance) gets 0 points from check, before training;
    so does attention that is the course's CrossAttention module."""
    from course_lib import exercises as E
    from course_lib.bench.honest_styles import _bernoulli_caption_step, _einsum_attention
    from course_lib.samplers import sample

    def library_loop(denoise, x, sigmas, y, scale):
        return sample(lambda z, s: denoise(z, s, y), x, sampler="euler", sigmas=sigmas).x

    def text_to_shapes():
        return {"cross_attention": _einsum_attention, "train_step": _bernoulli_caption_step, "sample_loop": library_loop}

    r = E.run_check("text_to_shapes", text_to_shapes, seed=0)
    assert r.status == E.FAILED and "course_lib.samplers.sample" in r.message


def test_ready_names_the_parts_still_to_write_and_a_wrong_attention(kit, capsys):
    from course_lib.exercises.lesson7 import _attend

    def stub(*args, **kwargs):
        raise NotImplementedError

    parts = ref_text_to_shapes()
    assert not C.ready({**parts, "train_step": stub, "sample_loop": stub}, kit)
    assert "Still to write: train_step, sample_loop" in capsys.readouterr().out
    assert C.attention_error(ref_cross_attention) < 1e-5
    assert not C.ready({**parts, "cross_attention": lambda *a: _attend(*a, use_mask=False)}, kit)
    assert "differs from torch's attention" in capsys.readouterr().out
    assert C.ready(parts, kit)
