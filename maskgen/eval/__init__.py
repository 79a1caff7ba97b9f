"""Evaluation: `maskgen eval linear-probe | knn | fewshot | finetune | fid`.

- `features`: frozen-encoder features of a dataset (MAGE, the VQGAN tokenizer, the fine-tuned classifier).
- `linear_probe`, `knn`, `fewshot`: classifiers on those features (MAE/MAGE LARS probe, DINO-style weighted
  kNN, UMD's closed-form few-shot ridge).
- `finetune`: end-to-end fine-tuning of a MAGE encoder through the training engine (method `finetune`).
- `fid`: Frechet distance, IS, KID, precision/recall between image sets (Inception when its weights are
  present locally, else the offline EfficientNet-Lite0 extractor, reported as FD-lite0).
Each command prints a table and writes JSON (`report`); `cli` holds their argparse code.
"""
