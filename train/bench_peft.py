"""The reference side of `python -m train.bench`: one LoRA training step in HF transformers + PEFT (PyTorch).

Run by `train.bench` under an interpreter that has torch (`--torch-python`), never imported by the
project: it reads a JSON spec (shapes, rank, dtype, steps) on stdin and prints one JSON line with the
seconds per step. Same model shapes, batch, LoRA targets (the language model's projections), loss window
and optimizer (AdamW) as the JAX side.
"""

import json
import sys
import time


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    spec = json.loads(sys.stdin.read())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"]), text_config=LlamaConfig(**spec["text"]),
                         image_token_index=spec["image_token_id"], vision_feature_layer=-2)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    lora = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapter weights in float32, as on the JAX side
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, length, n_image = spec["batch_size"], spec["seq_len"], spec["image_seq_length"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, spec["text"]["vocab_size"], (batch, length), generator=generator)
    ids[:, 1:1 + n_image] = spec["image_token_id"]
    labels = torch.full_like(ids, -100)
    labels[:, -spec["answer_window"]:] = ids[:, -spec["answer_window"]:]
    size = spec["vision"]["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=generator).to(device, dtype)
    ids, labels = ids.to(device), labels.to(device)
    mask = torch.ones_like(ids)

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(spec["warmup"]):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        loss = step()
    loss.item()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / spec["steps"]
    print(json.dumps({"seconds_per_step": seconds, "device": torch.cuda.get_device_name() if device == "cuda"
                      else "cpu", "torch": torch.__version__}))


if __name__ == "__main__":
    main()
