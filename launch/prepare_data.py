"""Prepare a TFDS dataset (array_record files, no TensorFlow) from local LLaVA files, for training and eval.

  python launch/prepare_data.py llava_instruct --manual-dir DIR --data-dir OUT   # llava_v1_5_mix665k.json + images
  python launch/prepare_data.py llava_pretrain --manual-dir DIR --data-dir OUT   # blip_laion_cc_sbu_558k.json + images/
  python launch/prepare_data.py shapes_vqa --data-dir OUT                        # the synthetic set and its tokenizer

Samples that cannot be used (bad schema, missing or corrupt images, inconsistent conversations) are skipped
and counted per reason in the log. Training then reads `--config.data.data_dir=OUT`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("llava_instruct", "llava_pretrain", "shapes_vqa"))
    parser.add_argument("--manual-dir", type=Path, help="folder with the annotation file and the images")
    parser.add_argument("--data-dir", type=Path, required=True, help="TFDS data_dir to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import tensorflow_datasets as tfds

    from atp_jax.data.builders import LlavaInstruct, LlavaPretrain, shapes_data

    if args.dataset == "shapes_vqa":
        data_dir, tokenizer_dir = shapes_data(args.data_dir)
        print(f"synthetic set in {data_dir}, tokenizer in {tokenizer_dir}")
        return 0
    if args.manual_dir is None or not args.manual_dir.is_dir():
        print(f"error: --manual-dir must be the folder holding the {args.dataset} files", file=sys.stderr)
        return 2
    builder_class = LlavaInstruct if args.dataset == "llava_instruct" else LlavaPretrain
    builder = builder_class(data_dir=str(args.data_dir), file_format="array_record")
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(args.manual_dir)))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{builder.info.full_name}: {builder.info.splits['train'].num_examples} samples in {builder.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
