"""Activation offloading (finetune/offload.py): offloaded layers compute what checkpointed ones do, copy each storage
once and no weight, free what they copied, and the run learns the same; so do checkpointed layers whose inputs are
offloaded."""

import pytest
import torch

import base_with_tflops
from conftest import tiny_args, train_counting_forwards
from finetune import architecture, cli, fusion, memory, modeling, offload
from finetune.cli import TrainArguments
from test_fusion import loss_and_grads

CASES = [("tiny-starcoder", "c_attn,c_proj"), ("tiny-starcoder2", "q_proj,k_proj,v_proj,o_proj")]


def checkpointed_model(name: str, targets: str, fused: bool, device: str = "cpu"):
    torch.manual_seed(0)
    model = modeling.add_lora(modeling.load_model(name, None, torch.float32).to(device),
                              modeling.lora_config(r=4, alpha=8, dropout=0.0, targets=targets),
                              gradient_checkpointing=True)
    for n, p in model.named_parameters():  # B starts at zero: give the adapter something to add
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    if fused:
        fusion.fuse_lora(model, recompute_gelu=False)
    return model.train()


def offload_some(model, monkeypatch, count: int = 2):
    """Offload `count` layers; returns the offloader and a record of the storages it was given, per layer: address ->
    bytes."""
    layers = modeling.decoder_layers(model)
    offloader = offload.use(model, [layers[i] for i in offload.spread(len(layers), count)])
    given: dict[int, dict[int, int]] = {}
    pack = offloader.pack

    def recording_pack(tensor):
        packed = pack(tensor)
        if not isinstance(packed, torch.Tensor):
            given.setdefault(packed[0], {})[packed[1]] = tensor.untyped_storage().nbytes()
        return packed

    monkeypatch.setattr(offloader, "pack", recording_pack)
    offloader.hooks = torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack)
    return offloader, given


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name,targets", CASES)
def test_offloaded_layers_give_the_loss_and_gradients_of_checkpointed_ones(monkeypatch, name, targets, fused):
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    model = checkpointed_model(name, targets, fused)
    ids = torch.randint(20, 4000, (2, 24))
    torch.manual_seed(1)  # the same dropout masks, which the offloaded layers save and the others draw again
    loss, grads = loss_and_grads(model, ids)
    offloader, given = offload_some(model, monkeypatch)

    torch.manual_seed(1)
    output = model(input_ids=ids, labels=ids)
    assert sorted(offloader.layers) == sorted(given) == [0, 1]  # the two offloaded layers, in order
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for index, layer in offloader.layers.items():  # each storage copied once, whole, and no weight
        assert layer.host and {key: host.numel() for key, host in layer.host.items()} == given[index]
        assert not weights & set(layer.host) and not layer.sources  # the forward has let go of the GPU's copies
        if name == "tiny-starcoder2" and not fused:  # q, k and v's LoRA each save the layer norm's output: one copy
            assert layer.unread > len(layer.host)
    model.zero_grad(set_to_none=True)
    output.loss.backward()
    assert offloader.layers == {}  # every copy read, and let go
    assert output.loss.item() == pytest.approx(loss, rel=1e-6)
    offloaded = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert offloaded.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(offloaded[n], grads[n], rtol=1e-5, atol=1e-7)

    with torch.no_grad():  # evaluation saves nothing, and leaves nothing for the next step to trip on
        model(input_ids=ids)
    assert all(not layer.host for layer in offloader.layers.values())
    torch.manual_seed(1)
    again, _ = loss_and_grads(model, ids)
    assert again == pytest.approx(loss, rel=1e-6) and offloader.layers == {}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name,targets", CASES)
def test_checkpointed_layers_with_their_inputs_offloaded_give_the_same_loss_and_gradients(monkeypatch, name, targets,
                                                                                          fused):
    monkeypatch.setattr(offload, "MIN_BYTES", 1)  # whatever has bytes to free (transformers 5.17 saves an empty one)
    model = checkpointed_model(name, targets, fused)
    ids = torch.randint(20, 4000, (2, 24))
    torch.manual_seed(1)
    loss, grads = loss_and_grads(model, ids)
    layers = modeling.decoder_layers(model)
    offloader = offload.use(model, [], layers)
    assert offload.offloaded(layers, inputs=True) == len(layers) and offload.offloaded(layers) == 0

    torch.manual_seed(1)  # the same dropout masks: the recompute draws them again as the checkpoint always does
    output = model(input_ids=ids, labels=ids)
    hidden_states = 2 * 24 * model.config.hidden_size * 4  # one (2, 24, hidden) fp32 tensor a layer
    assert sorted(offloader.layers) == list(range(len(layers)))
    for layer in offloader.layers.values():  # each layer's input, once, and nothing of what the layer computes
        assert [host.numel() for host in layer.host.values()] == [hidden_states] and layer.unread == 1
        assert not layer.sources
    model.zero_grad(set_to_none=True)
    output.loss.backward()
    assert offloader.layers == {}
    assert output.loss.item() == pytest.approx(loss, rel=1e-6)
    offloaded = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert offloaded.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(offloaded[n], grads[n], rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation does not checkpoint, and copies nothing
        model.eval()(input_ids=ids)
    assert offloader.layers == {}


def test_a_single_offloaded_layer_trains_step_after_step(monkeypatch):
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    model = checkpointed_model(*CASES[0], fused=True)
    ids = torch.randint(20, 4000, (2, 24))
    torch.manual_seed(1)
    expected = loss_and_grads(model, ids)[0]
    offloader, given = offload_some(model, monkeypatch, count=1)
    for _ in range(2):
        torch.manual_seed(1)
        assert loss_and_grads(model, ids)[0] == pytest.approx(expected, rel=1e-6)
    assert list(given) == [0] and offloader.layers == {}


def test_large_activations_are_copied_and_small_ones_and_weights_kept(monkeypatch):
    model = checkpointed_model(*CASES[0], fused=True)
    monkeypatch.setattr(offload, "MIN_BYTES", 2 * 24 * model.config.hidden_size * 4)  # a (2, 24, hidden) fp32 tensor
    offloader, given = offload_some(model, monkeypatch)
    ids = torch.randint(20, 4000, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    sizes = [size for layer in given.values() for size in layer.values()]
    assert sizes and min(sizes) >= offload.MIN_BYTES


def test_offloaded_layers_are_spread_among_the_checkpointed_ones():
    assert offload.spread(40, 20) == list(range(1, 40, 2))
    assert offload.spread(40, 10) == list(range(2, 40, 4))
    assert offload.spread(40, 1) == [20]
    assert offload.spread(21, 40) == list(range(21)) and offload.spread(0, 5) == [] and offload.spread(40, 0) == []
    for checkpointed, offloaded in [(40, 13), (21, 20), (7, 3)]:
        chosen = offload.spread(checkpointed, offloaded)
        assert len(set(chosen)) == offloaded and max(chosen) < checkpointed
    # on the CPU nothing to gain: the layers stay checkpointed
    assert offload.plan(40, 20) == (offload.spread(40, 20) if torch.cuda.is_available() else [])


def test_offloading_lowers_the_memory_estimate_below_checkpointing():
    config = architecture.config("gpt_bigcode", "15b")
    shape = memory.shape_of(config, 16, modeling.lora_targets(config, None))
    total = [memory.estimate(shape, "4bit", 1, 2048, 40, offloaded_layers=n)["total"] for n in (0, 20, 40)]
    assert total[0] > total[1] > total[2]
    kept = memory.estimate(shape, "4bit", 1, 2048, 0)["total"]
    assert total[2] < kept


def test_a_run_with_offloaded_layers_computes_each_forward_once_and_learns_as_the_checkpointed_run(
        tmp_path, monkeypatch, capsys):
    """The pipeline on a GPU (its only GPU-specific choice, offload.plan, taken as it is there): the offloaded layers
    run their forward once a step, the others twice, and the losses are those of every layer checkpointed."""
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    monkeypatch.setattr(offload, "plan", offload.spread)

    def train(name, offloaded):
        return train_counting_forwards(tiny_args(tmp_path / name, max_train_steps=2, eval_steps=2,
                                                 gradient_checkpointing=True, offloaded_layers=offloaded))

    flags, calls, losses = train("offloaded", 2)
    assert flags == [True, False, True, False]
    assert "activation checkpointing in 4 of 4 decoder layers, 2 of them offloaded to CPU memory" in \
        capsys.readouterr().out
    once = calls[1]  # the training forwards and the evaluations
    assert calls == [once + 2, once, once + 2, once]
    _, _, checkpointed_losses = train("checkpointed", 0)
    assert len(losses) == 2 and losses == pytest.approx(checkpointed_losses, rel=1e-5)


def test_offloaded_inputs_lower_the_estimate_by_all_but_two_checkpointed_inputs():
    config = architecture.config("gpt_bigcode", "15b")
    shape = memory.shape_of(config, 16, modeling.lora_targets(config, None))
    for checkpointed, kept in [(40, 2), (24, 2), (1, 1)]:
        saved = (memory.estimate(shape, "4bit", 2, 2048, checkpointed)["total"]
                 - memory.estimate(shape, "4bit", 2, 2048, checkpointed, offloaded_inputs=True)["total"])
        assert saved == pytest.approx((checkpointed - kept) * 2 * 2048 * 2 * config.hidden_size / memory.GIB)


def test_a_run_with_offloaded_inputs_recomputes_each_checkpointed_layer_and_learns_as_the_checkpointed_run(
        tmp_path, capsys):
    def train(name, **flags):
        return train_counting_forwards(tiny_args(tmp_path / name, max_train_steps=2, eval_steps=2,
                                                 gradient_checkpointing=True, checkpointed_layers="3", **flags))

    flags, calls, losses = train("inputs", offload_layer_inputs=True)
    assert "activation checkpointing in 3 of 4 decoder layers, 3 with their inputs in CPU memory" in \
        capsys.readouterr().out
    once = calls[3]  # the last layer, not checkpointed: the training forwards and the evaluations
    assert flags == [True, True, True, False] and calls == [once + 2] * 3 + [once]
    _, _, checkpointed_losses = train("checkpointed")
    assert len(losses) == 2 and losses == pytest.approx(checkpointed_losses, rel=1e-5)


def test_offloading_under_fsdp_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    argv = ["--model", "tiny-starcoder", "--dataset", "stdlib-code", "--gradient_checkpointing", "--offloaded_layers",
            "2", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(base_with_tflops.main, TrainArguments, argv=argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --offloaded_layers 2 is not built for FSDP, whose gathered "
                                                "weights it would copy out as activations: leave out "
                                                "--offloaded_layers 2")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the copies run on a CUDA stream")
@pytest.mark.parametrize("inputs", [False, True])
def test_on_a_gpu_the_copies_go_to_pinned_memory_and_give_the_same_loss_and_gradients(monkeypatch, inputs):
    monkeypatch.setattr(offload, "MIN_BYTES", 1)  # an empty tensor has no pinned memory to show
    model = checkpointed_model(*CASES[1], fused=True, device="cuda")
    ids = torch.randint(20, 4000, (2, 24), device="cuda")
    torch.manual_seed(1)
    loss, grads = loss_and_grads(model, ids)
    offloader = offload.use(model, [], modeling.decoder_layers(model)) if inputs else offload_some(model, monkeypatch)[0]
    torch.manual_seed(1)
    output = model(input_ids=ids, labels=ids)
    assert all(host.is_pinned() and host.device.type == "cpu" for layer in offloader.layers.values()
               for host in layer.host.values())
    model.zero_grad(set_to_none=True)
    output.loss.backward()
    assert offloader.layers == {} and output.loss.item() == pytest.approx(loss, rel=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)
