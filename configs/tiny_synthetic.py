"""The embedded default: a tiny LLaVA trained with ATP on the built-in synthetic shapes set, on a laptop CPU.

  python launch/train.py --config configs/tiny_synthetic.py --workdir DIR [--config.FIELD=VALUE ...]
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.total_steps = 300
    c.batch_size = 16  # global: split over processes, then sharded over the mesh's data and fsdp axes
    c.log_every = 10
    c.eval_every = 0  # steps between eval-split losses (0: none; the main job's report evaluates at the end)
    c.eval_batches = 4
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.max_bad_steps = 20  # consecutive non-finite steps before the run stops

    c.model = ConfigDict()
    c.model.init_from = ""  # a converted atp_jax checkpoint; empty: a fresh model of the size below
    c.model.preset = ""  # documentation of the expected architecture for init_from (e.g. "llava15_7b")
    c.model.dtype = "float32"  # compute dtype (bfloat16 keeps float32 master weights)
    c.model.vision = ConfigDict(dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=168, patch_size=14, projection_dim=64))  # 12 x 12 patches
    c.model.text = ConfigDict(dict(hidden_size=128, intermediate_size=344, num_hidden_layers=6, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=512))
    # Fresh models only: std of the vision tower's position embeddings at init (0: the module's default,
    # 1/sqrt(width)). The default leaves where a patch is about 30x weaker than what it shows, and training
    # from scratch never recovers it: the image features then hold no object's place (a linear probe's R^2 ~0).
    c.model.vision_position_std = 3.0
    c.model.remat = False  # recompute each decoder layer in the backward pass (memory for compute)
    # The decoder's attention in training and prefill: "auto" (the Pallas flash-attention kernel when compiled for
    # a TPU, XLA's elsewhere), "xla" or "pallas" (atp_jax/models/common.py).
    c.model.attention = "auto"

    c.pruning = ConfigDict()
    c.pruning.method = "atp"
    # After layers 0, 1 and 3 of 6: every instance keeps all its visual tokens in layer 0, which counts in the
    # average budget, so the more layers follow, the more tokens each of them may keep.
    c.pruning.atp_layers = (0, 1, 3)
    c.pruning.target_ratio = 0.3
    c.pruning.target_scope = "batch"  # the budget binds the batch's mean; each instance keeps what it needs
    c.pruning.temperature = 10.0
    c.pruning.lambda_atp = 0.05
    c.pruning.lambda_target = 1.0

    c.data = ConfigDict()
    c.data.source = "shapes_vqa/vqa"  # a TFDS name; shapes_vqa is generated on first use
    c.data.data_dir = ""  # TFDS data_dir for other sources
    c.data.cache_dir = ""  # where the synthetic set and its tokenizer live (default: WORKDIR/../.cache)
    c.data.tokenizer = ""  # tokenizer directory for other sources
    c.data.template = "vicuna_v1"
    c.data.image_mode = "pad"
    c.data.max_length = 208  # 144 image tokens + the longest vicuna_v1 question and answer (199)
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.worker_count = 0
    # ShapesConfig fields to change (atp_jax/data/synthetic.py), e.g. max_objects=3. The sizes are the defaults,
    # named here so that a stage can override them (a stage override may only change fields the config has).
    c.data.shapes = ConfigDict(dict(min_size=0.12, max_size=0.22))
    # Training images per config (vqa, multi, caption): stage 1 draws 300 x 16 captions from 8000 images, stage 2
    # 3000 x 16 four-question samples from 24000 (2 passes), stage 3 600 x 16 from 8000.
    c.data.shapes_train_size = 8000

    c.optim = ConfigDict()
    # Learning rates per parameter group; 0 freezes the group (no optimizer state is kept for it).
    c.optim.lr = 1e-3  # the LLM
    c.optim.projector_lr = -1.0  # negative: same as lr
    c.optim.atp_lr = 1e-3  # the threshold MLPs
    c.optim.vision_lr = 1e-3  # the vision tower
    c.optim.warmup_ratio = 0.03
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.accumulation_steps = 1

    # Distillation from the model the stage starts from, frozen and unpruned: weight * KL(teacher || student) of
    # the next-token distributions at the supervised tokens (0: none). Not in the ATP paper (docs/method.md).
    c.distill = ConfigDict(dict(weight=0.0, temperature=1.0))

    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, devices=0))  # devices: use the first N (0: all)
    c.distributed = ConfigDict(dict(coordinator="", num_processes=0, process_id=-1))

    # The main job runs LLaVA-1.5's chain at tiny scale, each stage in WORKDIR/<stage>, each from the model the
    # stage before it exported, then the comparison report. Nothing is pretrained here, so the tiny chain trains
    # every part in stage 1 (LLaVA-1.5 trains only the projector there); the vision tower is frozen after it.
    c.stages = ("pretrain", "finetune", "atp")
    c.stage_overrides = ConfigDict()
    c.stage_overrides.pretrain = ConfigDict(dict(
        total_steps=300,
        pruning=dict(method="none"),
        # Captions of larger objects (24-34% of the side, 3x the area): with the test's small ones, the fresh
        # model learns to look at them too slowly (stages 2 and 3 and the test use the default sizes).
        data=dict(source="shapes_vqa/caption", template="plain", shapes=dict(min_size=0.24, max_size=0.34)),
        optim=dict(lr=1e-3, atp_lr=0.0, vision_lr=1e-3)))
    # 3000 steps on 24000 images: relative position is the slowest skill to learn, and it needs new images more
    # than more passes over the same ones (docs/experiments.md).
    c.stage_overrides.finetune = ConfigDict(dict(
        total_steps=3000,
        pruning=dict(method="none"),
        # 4 questions per image (LLaVA-Instruct style)
        data=dict(source="shapes_vqa/multi", max_length=248, shapes_train_size=24000),
        # The vision tower stays as stage 1 left it (as in LLaVA-1.5), so its features keep where the objects are
        # (docs/experiments.md).
        optim=dict(lr=1e-3, atp_lr=0.0, vision_lr=0.0)))
    c.stage_overrides.atp = ConfigDict(dict(
        total_steps=600,
        pruning=dict(method="atp", target_ratio=0.32, target_scope="batch"),
        optim=dict(lr=2e-4, atp_lr=1e-3, vision_lr=0.0)))  # as the paper: LLM + projector + ATP, vision frozen
    c.report = ConfigDict(dict(enabled=True, test_size=1000, batch_size=50, timing_batch=16, visualizations=4))
    return c
