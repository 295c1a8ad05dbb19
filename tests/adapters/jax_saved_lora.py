"""The committed JAX-saved LoRA adapter (tests/golden/jax_saved_lora/) and how it is made.

`python tests/adapters/jax_saved_lora.py` rebuilds it: the golden base `llava_mha`, a LoRA with known
(seeded) weights on language-model, vision and projector projections with per-module rank / alpha
overrides, saved by `save_adapter`. `make golden` then loads it into PEFT in the torch reference venv
(`scripts/make_golden.py --saved-adapter jax_saved_lora`), which records PEFT's logits for it in
`jax_saved_lora.outputs.safetensors`. The test suite checks that `save_adapter` still writes exactly these
files and that their JAX logits are PEFT's, so the JAX -> PEFT direction rests on PEFT itself.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from valora_jax.adapters import AdapterConfig, AdapterParam, attach, save_adapter
from valora_jax.loading import load_pretrained

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "golden"
ADAPTER_DIR = GOLDEN / "jax_saved_lora"
PEFT_OUTPUTS = GOLDEN / "jax_saved_lora.outputs.safetensors"  # written by make_golden.py --saved-adapter
CONFIG = AdapterConfig(
    kind="lora", rank=3, alpha=6.0, towers=("language_model", "vision_tower", "multi_modal_projector"),
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "linear_2"),
    rank_pattern={r"language_model\.layers\.0\.mlp\.down_proj": 5}, alpha_pattern={"fc1": 2.0},
)


def adapted_model():
    model, _ = load_pretrained(GOLDEN / "llava_mha")
    attach(model, CONFIG, nnx.Rngs(0))
    rng = np.random.default_rng(11)
    for _, var in sorted(nnx.to_flat_state(nnx.state(model, AdapterParam)), key=lambda kv: str(kv[0])):
        var.set_value(jnp.asarray(0.2 * rng.standard_normal(var.shape), jnp.float32))
    return model


def golden_inputs():
    stored = load_file(str(GOLDEN / "llava_mha.outputs.safetensors"))
    return {k: stored[k] for k in ("input_ids", "attention_mask", "pixel_values", "position_ids")}


def logits(model, inputs):
    return np.asarray(model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                            jnp.asarray(inputs["position_ids"])))


def main():
    save_adapter(adapted_model(), ADAPTER_DIR, base_model="llava_mha")
    print(f"wrote {ADAPTER_DIR}; record PEFT's logits for it with scripts/make_golden.py --saved-adapter")


if __name__ == "__main__":
    main()
