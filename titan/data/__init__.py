"""The data a run reads, in a global order that no parallel layout changes: the tokenizer,
token documents and training windows read by global index (tokens), chat examples with their
loss masks (chat), streamed hub datasets (streaming), weighted mixtures of sources (blend), and
the dataloader that hands each data-parallel rank its share of every step (dataloader).
Below the trainer and above the config: nothing here knows of models or parallelism."""
