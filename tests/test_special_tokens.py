"""ernie_lab.special_tokens is the one home of the special token ids and modality codes.

The ids themselves are checked against their public sources in test_tokenizer.py; here: the module is a
leaf, and every older name and default that used to carry its own copy now reads this table.
"""

import ast
import dataclasses
import inspect
from pathlib import Path

from ernie_lab import processor, rope3d, routing, special_tokens, tokenizer, vl_model

PACKAGE = Path(special_tokens.__file__).parent


def test_special_tokens_is_a_leaf_module():
    tree = ast.parse((PACKAGE / "special_tokens.py").read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert imports == [], "special_tokens.py must import nothing, so that every module can import it"


def test_old_names_are_the_table():
    assert tokenizer.ERNIE_SPECIAL_TOKENS is special_tokens.SPECIAL_TOKENS
    assert tokenizer.ERNIE_TOKEN_ROLES is special_tokens.TOKEN_ROLES
    assert processor.IDS is special_tokens.PICTURE_TOKEN_IDS
    assert vl_model.TOKEN_IDS is special_tokens.TOKEN_IDS
    assert (routing.TEXT, routing.VISION) == (special_tokens.TEXT, special_tokens.VISION) == (0, 1)
    assert (rope3d.TEXT, rope3d.IMAGE, rope3d.VIDEO) == (0, 1, 2)


def test_picture_tables_agree_with_the_token_table():
    table = special_tokens.SPECIAL_TOKENS
    for key, (text, config_key) in special_tokens.PICTURE_TOKENS.items():
        assert special_tokens.PICTURE_TOKEN_IDS[key] == special_tokens.TOKEN_IDS[config_key] == table[text]
    assert set(special_tokens.TOKEN_ROLES.values()) <= set(table)


def test_defaults_elsewhere_read_the_table():
    ids = special_tokens.TOKEN_IDS
    defaults = {f.name: f.default for f in dataclasses.fields(vl_model.VLConfig) if f.name in ids}
    assert defaults == ids
    modality = inspect.signature(rope3d.modality_types).parameters
    assert (modality["image_token_id"].default, modality["video_token_id"].default) == (
        ids["image_token_id"], ids["video_token_id"])
    routing_args = inspect.signature(rope3d.routing_types).parameters
    assert routing_args["image_markers"].default == (ids["image_start_token_id"], ids["image_end_token_id"])
    assert routing_args["video_markers"].default == (ids["video_start_token_id"], ids["video_end_token_id"])
