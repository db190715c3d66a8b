"""Special token ids and modality codes (temporary; replaced by the ids branch)."""
VL_TOKEN_IDS = dict(image_token_id=100295, image_start_token_id=101304, image_end_token_id=101305,
                    video_token_id=103367, video_start_token_id=101306, video_end_token_id=101307)
TEXT, VISION = 0, 1
