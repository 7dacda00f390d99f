"""The ``train`` dict shared by all experiments (see ``dab_detr.engine.trainer`` for the keys)."""
train = dict(
    output_dir="./output",
    init_checkpoint="",  # e.g. a converted model-zoo checkpoint, or ImageNet backbone weights
    max_iter=90000,
    # autocast of evaluation and training: fp32 (the reference), bf16, fp16 (CUDA only), or auto
    # (bf16 where the CPU/GPU has it natively, else fp32); see dab_detr/precision.py
    precision="fp32",
    amp=dict(enabled=False),  # older switch, with precision fp32: training in fp16 on CUDA, bf16 on CPU
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,
    log_period=20,
    device=None,  # None: CUDA when available, else CPU
    clip_grad=dict(enabled=True, max_norm=0.1),
    # effective batch = dataloader.train.total_batch_size x grad_accumulation_steps
    grad_accumulation_steps=1,
    model_ema=dict(enabled=False, decay=0.9998, warmup=2000),
    seed=-1,
)
