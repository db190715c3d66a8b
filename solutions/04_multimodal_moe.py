"""Solutions to notebook 04's exercises."""

vision_experts = 64 * 3 * 2560 * 512             # 64 experts x (gate, up, down) x hidden x width 512

f_text = [0.0, 1.0]                              # share of the text tokens' choices per text expert
P_text = [0.1, 0.9]                              # mean text router probability per text expert
text_loss = 2 * sum(f * p for f, p in zip(f_text, P_text))

SOLUTIONS = {"04.vision_experts": (vision_experts,), "04.text_balance_loss": (text_loss,)}
WRONG = {
    "04.vision_experts": [(64 * 2560 * 512,), (64 * 3 * 2560 * 1536,)],
    "04.text_balance_loss": [(sum(f * p for f, p in zip(f_text, P_text)),),
                             (2 * (0.5 * (0.1 + 0.5) / 2 + 0.5 * (0.9 + 0.5) / 2),)],
}
