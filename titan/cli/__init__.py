"""titan's console commands, one module each with `main(argv) -> int` (pyproject's
[project.scripts]; in a checkout scripts/<name>.py runs the same without installing, as
scripts/preprocess_data.py and scripts/plot_metrics.py for the last two):

    titan-train             titan.train: train from a TOML config (`--job.config_file NAME`)
    titan-convert-to-hf     convert_to_hf: a DCP checkpoint -> a Hugging Face folder
    titan-convert-from-hf   convert_from_hf: a Hugging Face folder -> a model-only DCP folder
    titan-generate          generate: text from a DCP or Hugging Face checkpoint
    titan-evaluate          evaluate: loss and perplexity of a checkpoint on a dataset
    titan-plan              plan: parallel layouts that fit, ranked by estimated throughput
    titan-preprocess        preprocess: tokenize documents once into titan's token files
    titan-plot              plot: runs' metrics.jsonl against the step (extra `plot`)
    titan-verify-checkpoint verify_checkpoint: a checkpoint's files against their checksums
"""
