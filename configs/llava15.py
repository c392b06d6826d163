"""The LLaVA-1.5 recipes at full size, shared by llava15_7b_*.py and llava15_13b_atp.py (not a config itself).

Stage 1 (pretrain): the projector alone on LLaVA-Pretrain captions (`plain`), lr 1e-3, batch 256, 1 epoch.
Stage 2 (finetune): LLM + projector on LLaVA-Instruct 665K (`vicuna_v1`), lr 2e-5, batch 128 (two micro-batches
of 64), 1 epoch.
ATP: from a converted LLaVA-1.5 checkpoint, LLM + projector (2e-5) + ATP modules (1e-4) in soft mode with the
budget losses, vision tower frozen, batch 128 (two micro-batches of 64), cosine with 3% warm-up, 1 epoch.
Set `model.init_from`, `data.data_dir` (TFDS data from `launch/prepare_data.py`) and `data.tokenizer` (the
checkpoint's own by default) on the command line. `model.init_from` for each stage:
  pretrain  `launch/convert.py assemble --src vicuna-7b-v1.5 --vision-src clip-vit-large-patch14-336 --dst D`
  finetune  the pretrain run's WORKDIR/model
  atp       the finetune run's WORKDIR/model, or a converted released LLaVA-1.5 (`launch/convert.py hf-to-jax`)
"""

import math

from configs.tiny_synthetic import get_config as tiny_synthetic

SAMPLES = {"pretrain": 558_128, "finetune": 665_298, "atp": 665_298}


def llava15(size: str, stage: str):
    c = tiny_synthetic()
    c.model.preset = f"llava15_{size}"
    c.stages = ()  # one run, not the tiny chain
    c.model.init_from = ""  # required: a converted checkpoint (launch/convert.py hf-to-jax) on a shared disk
    c.model.dtype = "bfloat16"
    c.model.remat = True
    # Global batch 256 (stage 1) or 128 per update. Past stage 1, two micro-batches of 64 per update: the 7B step at
    # 128 x 2048 tokens needs 36.2 GiB per v4 chip, at 64 30.4 GiB (launch/aot.py, README).
    c.batch_size = 256 if stage == "pretrain" else 64
    c.optim.accumulation_steps = 1 if stage == "pretrain" else 2
    c.total_steps = math.ceil(SAMPLES[stage] / c.batch_size)  # one epoch of micro-batches
    c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every, c.keep_checkpoints = 10, 500, 8, 500, 3
    c.pruning.method = "atp" if stage == "atp" else "none"
    c.pruning.atp_layers = (4, 14, 24) if size == "7b" else (5, 17, 30)  # 4/14/24 of 32 layers; scaled for 40
    if stage == "pretrain":
        c.data.source, c.data.template = "llava_pretrain/558k", "plain"
    else:
        c.data.source, c.data.template = "llava_instruct/mix665k", "vicuna_v1"
    c.data.data_dir = ""
    c.data.tokenizer = ""
    c.data.eval_split = ""
    c.data.max_length = 2048
    c.data.worker_count = 8
    c.optim.lr = 0.0 if stage == "pretrain" else 2e-5  # 0: the LLM frozen
    c.optim.projector_lr = 1e-3 if stage == "pretrain" else -1.0
    c.optim.atp_lr = 1e-4
    c.optim.vision_lr = 0.0  # frozen in every stage
    c.optim.warmup_ratio = 0.03
    c.optim.weight_decay = 0.0
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # FSDP over every chip
    return c
