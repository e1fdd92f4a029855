"""The model layer: what a policy is and how it runs a forward, below everything else.

Loading (``loading``: HF names and folders, ``tiny-<family>`` built offline with a character or a byte-level BPE
tokenizer trained offline on the caller's corpus, ``bpe_tokenizer``), tokenisation of batches
(``batching``), the plain forward with positions from the mask (``forward``), the padding-free forward
(``packing``), LoRA adapters (``lora``), FSDP2 sharding (``sharding``), the per-family layout of the attention
projections (``families``) and the decoder parts read through it (``architectures``), and the tiny random model
of each family (``tiny_families``).

Imports: nothing else of corrpo. Every other room may import this one.
"""
