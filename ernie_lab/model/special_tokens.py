"""ERNIE 4.5's special tokens and modality codes: the one table every other module reads.

A special token is a string the tokenizer never cuts into pieces; it has its own id. The big ERNIE 4.5
checkpoints put them far above the ordinary pieces:

    <|begin_of_sentence|> 100273   opens every chat          <|IMAGE_START|> 101304   opens a picture
    <|end_of_sentence|>   100272   closes an assistant turn  <|IMAGE_PLACEHOLDER|> 100295   one image token

These ids are *defaults*. A checkpoint says where its tokens sit (tokenizer files: text -> id; config.json:
``image_token_id`` ...), and a small model with a compact vocabulary puts them elsewhere, so code that
knows a checkpoint reads its ids from there and falls back to this table only when it knows nothing.

Modality codes label tokens: 0 text, 1 image, 2 video for the 3-D positions; the MoE knows only two
groups, text (0) and vision (1), since images and videos share the vision experts.
This module imports nothing from the package, so any module may import it.
"""

# ---------------------------------------------------------------------------------------- token texts
BEGIN_OF_SENTENCE = "<|begin_of_sentence|>"
END_OF_SENTENCE = "<|end_of_sentence|>"
IMAGE_PLACEHOLDER = "<|IMAGE_PLACEHOLDER|>"
IMAGE_START, IMAGE_END = "<|IMAGE_START|>", "<|IMAGE_END|>"
VIDEO_PLACEHOLDER = "<|VIDEO_PLACEHOLDER|>"
VIDEO_START, VIDEO_END = "<|VIDEO_START|>", "<|VIDEO_END|>"

# ---------------------------------------------------------------------------------------- their ids
# Each id checked against a public source:
#   <unk> 0, <s> 1, </s> 2: transformers tests/models/ernie4_5/test_tokenization_ernie4_5.py ("<s>" encodes
#       to [1], eos appends 2) and Baidu's generation_config.json (bos 1, eos 2, pad 0).
#   <|end_of_sentence|> 100272, <|begin_of_sentence|> 100273: the chat test in the same transformers file
#       ([100273, ... "Nice to meet you." ..., 100272]); PaddleFormers' ERNIE-VL test input ids agree.
#   <|IMAGE_PLACEHOLDER|> 100295: config "im_patch_id" of the VL checkpoints; transformers'
#       Ernie4_5_VLMoeConfig.image_token_id.
#   <|IMAGE_START|>..<|VIDEO_END|> 101304..101307, <|VIDEO_PLACEHOLDER|> 103367: transformers'
#       Ernie4_5_VLMoeConfig defaults; its VL integration test shows "Picture 1:" then 101304, 100295.
#       The VL conversion renames Baidu's <|AUDIO_PLACEHOLDER|> to <|VIDEO_PLACEHOLDER|>, keeping the id.
# Baidu's tokenizer_config.json also names <mask:1> (mask) and <mask:4>..<mask:7> (system/header markers);
# their ids could not be found in any reachable source, so the table leaves them out rather than guess.
# A real tokenizer.model carries all of them and the tokenizer then uses its ids.
SPECIAL_TOKENS = {  # text -> id
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    END_OF_SENTENCE: 100272,
    BEGIN_OF_SENTENCE: 100273,
    IMAGE_PLACEHOLDER: 100295,
    IMAGE_START: 101304,
    IMAGE_END: 101305,
    VIDEO_START: 101306,
    VIDEO_END: 101307,
    VIDEO_PLACEHOLDER: 103367,
}

# What each special token is for, as Baidu's tokenizer_config.json names them.
TOKEN_ROLES = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "cls_token": BEGIN_OF_SENTENCE,  # opens every chat
    "sep_token": END_OF_SENTENCE,    # closes every assistant turn
}
ROLE_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")

# ---------------------------------------------------------------------------------------- picture tokens
# The six tokens around pictures under three names: a short key (the processor's), the token's text
# (the tokenizer's), and the config.json key (the model's).
PICTURE_TOKENS = {  # key -> (text, config.json key)
    "image": (IMAGE_PLACEHOLDER, "image_token_id"),
    "image_start": (IMAGE_START, "image_start_token_id"),
    "image_end": (IMAGE_END, "image_end_token_id"),
    "video": (VIDEO_PLACEHOLDER, "video_token_id"),
    "video_start": (VIDEO_START, "video_start_token_id"),
    "video_end": (VIDEO_END, "video_end_token_id"),
}
PICTURE_TOKEN_IDS = {key: SPECIAL_TOKENS[text] for key, (text, _) in PICTURE_TOKENS.items()}  # key -> id
TOKEN_IDS = {config_key: SPECIAL_TOKENS[text] for text, config_key in PICTURE_TOKENS.values()}  # config key -> id

IMAGE_TOKEN_ID = SPECIAL_TOKENS[IMAGE_PLACEHOLDER]
VIDEO_TOKEN_ID = SPECIAL_TOKENS[VIDEO_PLACEHOLDER]
IMAGE_MARKER_IDS = (SPECIAL_TOKENS[IMAGE_START], SPECIAL_TOKENS[IMAGE_END])  # (start, end)
VIDEO_MARKER_IDS = (SPECIAL_TOKENS[VIDEO_START], SPECIAL_TOKENS[VIDEO_END])

# ---------------------------------------------------------------------------------------- modality codes
TEXT, IMAGE, VIDEO = 0, 1, 2  # token types of the 3-D positions (rope3d)
VISION = 1                    # the MoE's second expert group: image and video tokens alike (routing)
