"""Checkpoints and inputs: from files and conversations to tensors, and back to files.

    architectures   the model-type registry (config.json "architectures" -> our classes and name tables)
    hub_names       Hub tensor names <-> our module paths, written out as data
    loading         load_model: streamed, checked loading (single or sharded safetensors, -PT and -Paddle)
    saving          save_model: the Hub layout, written atomically
    quantized       quantized checkpoints: the tensors a QuantLinear stores, under Hub names
    tokenizer       the SentencePiece tokenizer (real, or the stand-in that ships with the kit)
    chat_format     ERNIE's chat text
    reasoning       which models think; a reply split into its reasoning and its answer
    image_processing, processor   pictures -> patches; a chat with pictures -> model inputs (PIL, on use)
    chat            ernie_lab.chat: a conversation in, the reply out

May import: ``ernie_lab.errors``, ``ernie_lab.atomic``, ``ernie_lab.model``, ``ernie_lab.quant``.
"""
