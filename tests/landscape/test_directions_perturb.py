"""Directions and in-place perturbation: determinism, normalization, orthogonality, exact restore."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from safety_guard.landscape.directions import InterpolationDirection, LoraDirection, RandomDirection
from safety_guard.landscape.orthogonal import direction_slices, orthogonal_coefficients
from safety_guard.landscape.perturb import WeightPerturbation
from safety_guard.models.parameters import ParameterSelection, perturbable_parameters


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_seed_same_direction_repeated_and_across_dtypes():
    w = torch.randn(8, 5)
    d = RandomDirection(seed=7, normalization="none")
    first = d.tensor("layers.0.w", w)
    assert torch.equal(first, d.tensor("layers.0.w", w))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert torch.equal(first, d.tensor("layers.0.w", w.to(dtype)))
    # normalized slices agree up to the rounding of the weight norm in that dtype
    normed = RandomDirection(seed=7)
    ref = normed.tensor("layers.0.w", w)
    assert torch.allclose(ref, normed.tensor("layers.0.w", w.to(torch.bfloat16)), rtol=1e-2)
    assert not torch.equal(first, d.tensor("layers.1.w", w))
    assert not torch.equal(
        first, RandomDirection(seed=8, normalization="none").tensor("layers.0.w", w)
    )


def test_layer_and_filter_normalization():
    w = torch.randn(6, 4) * torch.arange(1, 7).view(6, 1)
    layer = RandomDirection(seed=0).tensor("w", w)
    assert torch.allclose(layer.norm(), w.norm(), rtol=1e-5)
    filt = RandomDirection(seed=0, normalization="filter").tensor("w", w)
    assert torch.allclose(filt.norm(dim=1), w.norm(dim=1), rtol=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        RandomDirection(seed=0, normalization="batch")


def test_norm_layers_excluded_by_module_type_and_configurable():
    model = make_model()
    names = [n for n, _ in perturbable_parameters(model)]
    assert not any(n.endswith("layernorm.weight") or n == "model.norm.weight" for n in names)
    assert "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in names  # tied: moved once, via the embedding
    kept = [n for n, _ in perturbable_parameters(model, ParameterSelection(exclude_norm=False))]
    assert "model.norm.weight" in kept
    fewer = [n for n, _ in perturbable_parameters(model, ParameterSelection(exclude=[r"embed"]))]
    assert "model.embed_tokens.weight" not in fewer
    with pytest.raises(ValueError, match="regex"):
        ParameterSelection(exclude=["("])


def test_second_direction_is_orthogonal_to_first():
    model = make_model()
    dirs = [RandomDirection(0), RandomDirection(1)]
    dot = sq1 = sq2 = 0.0
    for name, p in perturbable_parameters(model):
        s1, s2 = direction_slices(dirs, name, p.detach())
        dot += float((s1.double() * s2.double()).sum())
        sq1 += float(s1.double().pow(2).sum())
        sq2 += float(s2.double().pow(2).sum())
        assert torch.allclose(s2.norm(), p.detach().norm(), rtol=1e-4)  # still layer-normalized
    assert abs(dot) / (sq1 * sq2) ** 0.5 < 1e-5


@pytest.mark.parametrize("normalization", ["layer", "none"])
def test_orthogonalized_random_directions_move_as_streamed_combinations(normalization):
    # a 2D landscape's move streams each Gaussian once (orthogonal_coefficients), and lands
    # where the whole orthogonalized slices (direction_slices) put the weights
    model = make_model()
    dirs = [RandomDirection(3, normalization), RandomDirection(4, normalization)]
    origin = {n: p.detach().clone() for n, p in perturbable_parameters(model)}
    with WeightPerturbation(model, dirs) as move:
        assert move._combined
        move.apply(0.3, -0.7)
        for name, p in perturbable_parameters(model):
            s1, s2 = direction_slices(dirs, name, origin[name])
            expected = origin[name] + 0.3 * s1 - 0.7 * s2
            scale = float(expected.abs().max())
            assert float((p.detach() - expected).abs().max()) <= 1e-5 * scale, name
    for name, p in perturbable_parameters(model):
        assert torch.equal(p.detach(), origin[name])  # restored bit for bit
    # the coefficients: the first direction as it is, the second orthogonal to it, same norm
    name, w = next(iter(origin.items()))
    rows = orthogonal_coefficients(dirs, name, w.numel(), float(w.double().pow(2).sum()))
    gram = [[a.gaussian_dot(b, name, w.numel()) for b in dirs] for a in dirs]

    def dot(u, v):
        return sum(u[i] * gram[i][k] * v[k] for i in range(2) for k in range(2))

    assert rows[0][1] == 0.0 and abs(dot(rows[0], rows[1])) < 1e-9 * dot(rows[0], rows[0])
    scale2 = dirs[1].scale_for(name, w.numel(), float(w.double().pow(2).sum()))
    assert dot(rows[1], rows[1]) == pytest.approx(scale2**2 * gram[1][1])  # its own norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_bit_exact_after_100_random_moves(dtype, offload):
    model = make_model(dtype=dtype)
    before = _state(model)
    gen = torch.Generator().manual_seed(0)
    with WeightPerturbation(
        model, [RandomDirection(3), RandomDirection(4)], offload=offload
    ) as move:
        for _ in range(100):
            a, b = (torch.rand(2, generator=gen) - 0.5).tolist()
            move.apply(a, b)
        moved = _state(model)
    after = _state(model)
    assert any(not torch.equal(before[k], moved[k]) for k in before)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_norm_tensors_untouched_and_tied_weights_moved_once():
    model = make_model()
    before = _state(model)
    direction = RandomDirection(5)
    with WeightPerturbation(model, [direction]) as move:
        move.apply(0.25)
        for name, value in model.state_dict().items():
            if "norm" in name:
                assert torch.equal(value, before[name]), name
        emb = model.model.embed_tokens.weight
        assert emb.data_ptr() == model.lm_head.weight.data_ptr()
        expected = before["model.embed_tokens.weight"] + 0.25 * direction.tensor(
            "model.embed_tokens.weight", before["model.embed_tokens.weight"]
        )
        assert torch.allclose(emb, expected, atol=1e-6)


def test_restore_on_exception_inside_block():
    model = make_model()
    before = _state(model)
    with (
        pytest.raises(RuntimeError, match="boom"),
        WeightPerturbation(model, [RandomDirection(0)]) as move,
    ):
        move.apply(0.3)
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nan_weights_are_refused_and_nothing_changes():
    model = make_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with (
        pytest.raises(ValueError, match=r"up_proj.*NaN"),
        WeightPerturbation(model, [RandomDirection(0)]),
    ):
        pass


def test_interpolation_direction_reaches_target():
    aligned, finetuned = make_model(seed=0), make_model(seed=1)
    target = _state(finetuned)
    with WeightPerturbation(aligned, [InterpolationDirection(finetuned)]) as move:
        move.apply(1.0)
        for name, p in perturbable_parameters(aligned):
            assert torch.allclose(p, target[name], atol=1e-6), name
        move.apply(0.5)
    # state-dict source gives the same slice as a module source
    sd_dir = InterpolationDirection({k: v for k, v in target.items()})
    w = aligned.model.layers[0].mlp.up_proj.weight.detach()
    mod_dir = InterpolationDirection(finetuned)
    assert torch.equal(
        sd_dir.tensor("model.layers.0.mlp.up_proj.weight", w),
        mod_dir.tensor("model.layers.0.mlp.up_proj.weight", w),
    )


def test_peft_wrapped_model_names_and_exact_restore(tmp_path):
    from peft import LoraConfig, get_peft_model

    base_names = [n for n, _ in perturbable_parameters(make_model())]
    model = get_peft_model(
        make_model(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0)
    )
    assert [n for n, _ in perturbable_parameters(model)] == base_names
    with torch.no_grad():  # non-zero adapter so the LoRA direction is non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with WeightPerturbation(model, [RandomDirection(1)]) as move:
        move.apply(0.4)
        assert not torch.equal(
            model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight,
            before["base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"],
        )
        for k, v in model.state_dict().items():
            if "lora_" in k:
                assert torch.equal(v, before[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    # the LoRA direction equals the merged weight update, live or from the saved adapter
    live = LoraDirection(model)
    model.save_pretrained(tmp_path / "adapter")
    saved = LoraDirection(tmp_path / "adapter")
    name = "model.layers.1.self_attn.q_proj.weight"
    origin = model.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight.detach()
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    expected = layer.get_delta_weight("default")
    assert torch.allclose(live.tensor(name, origin), expected, atol=1e-6)
    assert torch.allclose(saved.tensor(name, origin), expected, atol=1e-6)
    assert live.tensor("model.norm.weight", origin) is None
    # an FSDP2 shard's range of it (rows of dim 0, or any flat range), from its rows only
    whole = expected.reshape(-1)
    for offset, count in (
        (0, origin.numel() // 2),
        (origin.numel() // 2, origin.numel() // 2),
        (37, 101),
    ):
        part = origin.reshape(-1)[offset : offset + count]
        got = saved.shard_tensor(name, part, offset, origin.shape)
        assert torch.allclose(got, whole[offset : offset + count], atol=1e-6), (offset, count)
    assert saved.shard_tensor("model.norm.weight", origin, 0, origin.shape) is None
    # a transposed (fan_in_fan_out) adapter too
    a, b, scale, _ = saved.factors()[name]
    saved._factors[name] = (b.T.contiguous(), a.T.contiguous(), scale, True)
    flipped = saved.tensor(name, origin)
    got = saved.shard_tensor(name, origin.reshape(-1)[37:138], 37, origin.shape)
    assert torch.allclose(got, flipped.reshape(-1)[37:138], atol=1e-6)
    # interpolation: the range of the target minus the shard's own θ₀
    interp = InterpolationDirection({name: origin + 1.5})
    got = interp.shard_tensor(name, origin.reshape(-1)[40:90], 40, origin.shape)
    assert torch.allclose(got, torch.full((50,), 1.5), atol=1e-6)
    with pytest.raises(ValueError, match="different architectures"):
        interp.shard_tensor(name, origin.reshape(-1)[:4], 0, (3, 3))


def test_fingerprint_of_a_tensor_larger_than_2_pow_24():
    from safety_guard.models.fingerprint import model_fingerprint

    big = torch.nn.Linear(4100, 4100, bias=False)  # 16.8 M elements: float32 positions overflow
    fp = model_fingerprint(big)
    assert fp["tensors"][0]["samples"][-1] == float(big.weight.reshape(-1)[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_move_equals_whole_slice_bit_for_bit(monkeypatch, dtype):
    """Chunked generation draws the same Gaussian stream as one randn call, for any size."""
    import safety_guard.landscape.directions as directions_module

    monkeypatch.setattr(directions_module, "CHUNK_ELEMENTS", 32)  # many chunks, odd tails
    model = torch.nn.ModuleDict(
        {
            name: torch.nn.Linear(cols, rows, bias=False)
            for name, (rows, cols) in {
                "a": (3, 343),
                "b": (5, 206),
                "c": (7, 1),
                "d": (4, 8),
            }.items()
        }
    ).to(dtype)  # 1029, 1030, 7 and 32 elements: tails of 5, 6, 7 and 0 past a chunk
    before = {k: v.clone() for k, v in model.state_dict().items()}
    direction = RandomDirection(seed=3)
    with WeightPerturbation(model, [direction]) as move:
        move.apply(-0.37)
        for name, param in model.named_parameters():
            whole = direction.tensor(name, before[name])  # one randn call for the whole tensor
            expected = before[name].to(torch.float32, copy=True).add_(whole, alpha=-0.37)
            expected = expected.to(dtype)
            assert torch.equal(param, expected), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_chunk_bounds_merge_short_tails():
    from safety_guard.landscape.directions import chunk_bounds

    assert chunk_bounds(1030, 1024) == [(0, 1030)]
    assert chunk_bounds(1040, 1024) == [(0, 1024), (1024, 1040)]
    assert chunk_bounds(5, 1024) == [(0, 5)]
    with pytest.raises(ValueError, match="multiple of 16"):
        chunk_bounds(100, 10)
    generator = torch.Generator().manual_seed(0)
    whole = torch.randn(3 * 48 + 7, generator=generator)
    generator.manual_seed(0)
    parts = [torch.randn(b - a, generator=generator) for a, b in chunk_bounds(whole.numel(), 48)]
    assert torch.equal(torch.cat(parts), whole)


def test_sharded_safetensors_targets_are_read_tensor_by_tensor(tmp_path):
    aligned, finetuned = make_model(seed=0), make_model(seed=1)
    # save_pretrained shards a checkpoint past max_shard_size and writes the index file
    finetuned.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    from_folder = InterpolationDirection(tmp_path / "sharded")
    from_module = InterpolationDirection(finetuned)
    for name, p in perturbable_parameters(aligned):
        assert torch.equal(from_folder.tensor(name, p), from_module.tensor(name, p)), name
    # without the index, the shards' own key lists are read
    (tmp_path / "sharded" / "model.safetensors.index.json").unlink()
    no_index = InterpolationDirection(tmp_path / "sharded")
    name, p = next(iter(perturbable_parameters(aligned)))
    assert torch.equal(no_index.tensor(name, p), from_module.tensor(name, p))
    # a shard the index names but the folder lacks: a clear error, before any move
    finetuned.save_pretrained(tmp_path / "partial", max_shard_size="20KB")
    sorted((tmp_path / "partial").glob("*.safetensors"))[-1].unlink()
    with pytest.raises(FileNotFoundError, match="names shards missing"):
        InterpolationDirection(tmp_path / "partial")


def test_random_direction_ranges_add_up_to_the_whole_slice(monkeypatch):
    """A shard (FSDP2) gets its index range of the same slice, whatever the chunking: the ranges
    of three "ranks" added separately equal the whole slice added at once."""
    import safety_guard.landscape.directions as directions_module

    monkeypatch.setattr(directions_module, "CHUNK_ELEMENTS", 1024)  # several chunks per tensor
    d = RandomDirection(seed=7)
    origin = torch.randn(50, 100, generator=torch.Generator().manual_seed(0))
    scale = d.scale("w", origin)
    whole = origin.clone().reshape(-1)
    d.add_to("w", whole, 0.5, scale)
    pieces = origin.clone().reshape(-1)
    bounds = [(0, 1700), (1700, 3400), (3400, 5000)]  # not on chunk boundaries
    for a, b in bounds:
        d.add_to("w", pieces[a:b], 0.5, scale, offset=a, numel=5000)
    assert torch.equal(pieces, whole)
    assert not torch.equal(whole, origin.reshape(-1))
    # the scale from the norm summed over the ranges is the scale of the whole tensor
    total = sum(float(origin.reshape(-1)[a:b].double().pow(2).sum()) for a, b in bounds)
    assert abs(d.scale_for("w", 5000, total) - scale) <= 1e-12 * scale
