"""The trunk's own fp32 logits for a checkpoint, at any TP/PP/VP layout: the reference that
`melama convert ... --verify` compares transformers with, and that tests compare conversions,
exports and adapters with. The model is the one training builds (`build_model_chunks`), loaded by
the trainer's Checkpointer and run through megatron's pipeline schedule."""

from __future__ import annotations

from pathlib import Path

import torch

from melama_mcore.errors import CheckpointError
from melama_mcore.models.llama import state_dict_adapter as sda
from melama_mcore.models.llama.config_registry import LlamaArch


@torch.no_grad()
def framework_logits(ckpt: Path, arch: LlamaArch, tokens: torch.Tensor, tp: int = 1, pp: int = 1,
                     vp: int | None = None, divisible_by: int = 128, *, adapter: Path | None = None,
                     round_to: torch.dtype | None = None) -> torch.Tensor | None:
    """fp32 CPU logits [batch, seq, vocab] of the model initialised from checkpoint `ckpt` at a
    TP/PP/VP layout; with the LoRA adapters of the adapter checkpoint `adapter` on top when given;
    with every weight rounded to `round_to` first when given (what an export in that dtype holds).
    Runs on CPU (megatron on CPU needs CUDA hidden: start-up refuses otherwise). Call it on every
    rank (torchrun) or alone for 1x1; the last pipeline stage returns the logits gathered across TP
    with the vocab padding stripped, other ranks None."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from melama_mcore.checkpoint.checkpointer import Checkpointer
    from melama_mcore.checkpoint.integrity import model_identity
    from melama_mcore.checkpoint.layout import read_config
    from melama_mcore.distributed import parallel
    from melama_mcore.models.llama.lora import apply_lora
    from melama_mcore.models.llama.model import build_model_chunks
    from melama_mcore.startup import start

    cfg = sda.arch_config(arch, tp, pp, vp, divisible_by)
    if adapter is not None:
        _, peft = read_config(adapter)
        if peft is None:
            raise CheckpointError(f"{adapter} is not an adapter checkpoint (its config.yaml has no peft.method: lora)")
        cfg.peft, cfg.checkpoint.init_from = peft, str(ckpt)
    cfg.model.backend = "native"
    cfg.training.device, cfg.training.precision, cfg.training.seq_length = "cpu", "fp32", tokens.shape[1]
    runtime = start(cfg)
    try:
        chunks = build_model_chunks(cfg, arch, runtime.backend)
        checkpointer = Checkpointer(cfg, chunks, None, None, identity=model_identity(arch, None))
        if adapter is not None:  # as the trainer: adapters added, then the base loaded, then the adapters
            apply_lora(chunks, cfg.peft, seed=cfg.training.seed)
        checkpointer.load_weights(str(ckpt))
        if adapter is not None:
            checkpointer.load_adapters(adapter)
        for chunk in chunks:
            chunk.eval()
            if round_to is not None:
                for param in chunk.parameters():
                    param.copy_(param.to(round_to))
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        microbatches = pp if vp else 1  # the interleaved schedule needs a multiple of pp micro-batches

        def forward_step(data_iterator, model):
            return model(next(data_iterator), positions, None), lambda out, non_loss_data=False: out

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter([tokens] * microbatches) for _ in chunks],
            model=chunks, num_microbatches=microbatches, seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0], forward_only=True, collect_non_loss_data=True)
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return None
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(outputs[0].contiguous())
        return logits[..., : arch.vocab_size].float()
    finally:
        parallel.shutdown()

