"""The proxy LVLM's training recipe: a small standard ``LlavaForConditionalGeneration`` trained on the digits world.

Not part of the installed library: ``v2drop`` only loads the trained model (``v2drop.load("proxy")``).
The recipe, the validity bar and the proxy's history are described in ``docs/proxy.md``.

- ``model``: tokenizer, processor (chat template) and the model's shape and initialisation;
- ``data``: scene streams, the training conversations and their dense auxiliary turns;
- ``drops``: vision-token drops during training, applied as per-layer attention masks;
- ``video``: the optional video stage (clip streams, clip conversations and drops, frame tags);
- ``train``: the configs, the Lightning modules and callbacks, and ``train``;
- ``check``: the quality and validity bars (``python -m experiments.check_proxy``).

Entry points: ``python -m experiments.train_proxy`` and ``python -m experiments.check_proxy``.
"""
