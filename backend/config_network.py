"""The `network` section of the training configuration: one model per network type (LoRA, LoCon,
LoHa, LoKr, DoRA), told apart by `type`. Part of `backend.config`, which re-exports every name here.

This module never imports torch: the GUI and the CLI load it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Discriminator, Field, Tag, field_validator, model_validator

from backend.config_base import Section

UNET_TARGETS_DEFAULT = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_ENCODER_TARGETS_DEFAULT = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


class NetworkBase(Section):
    """What every network type has: its size, what it trains, and where it starts."""

    rank: int = Field(16, ge=1, le=1024, description="Rank (network_dim): the size of each low-rank update.")
    alpha: float = Field(
        16.0, gt=0, le=4096, description="Alpha (network_alpha). The update is scaled by alpha/rank."
    )
    train_unet: bool = Field(True, description="Train the network on the UNet.")
    train_text_encoder: bool = Field(False, description="Train the network on the text encoder(s) too.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(UNET_TARGETS_DEFAULT),
        min_length=1,
        description="UNet module names (suffixes) that get the network. The default covers the transformer blocks, as kohya's LoRA does.",
    )
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: list(TEXT_ENCODER_TARGETS_DEFAULT),
        min_length=1,
        description="Text-encoder module names that get the network when train_text_encoder is on.",
    )
    network_weights: str | None = Field(
        None,
        validation_alias=AliasChoices("network_weights", "init_weights"),
        description="Start from this LoRA/LyCORIS .safetensors file (Lathe's or sd-scripts'): its weights are the "
        "starting point of a new run, with a fresh optimizer (not a resume). Its shapes must match this network.",
    )
    module_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Module dropout (kohya's module_dropout): in each training forward, each network module is "
        "skipped (the base layer alone) with this probability. 0: off.",
    )

    @model_validator(mode="after")
    def _check(self) -> NetworkBase:
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("train_unet: nothing to train: enable train_unet or train_text_encoder (or both)")
        if getattr(self, "use_tucker", False) and not getattr(self, "conv_rank", 0):
            raise ValueError(
                "use_tucker: Tucker decomposition applies to the 3x3 convolutions; set network.conv_rank above 0 "
                "or turn use_tucker off"
            )
        if self.network_weights is not None and not self.network_weights.strip():
            raise ValueError("network_weights: empty path; leave it unset to start from fresh weights")
        return self


def _dropout_field() -> Any:
    return Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout on the down projection's output during training (kohya's network_dropout).",
    )


def _rank_dropout_field() -> Any:
    return Field(
        0.0, ge=0.0, lt=1.0,
        description="Rank dropout (kohya's rank_dropout): drop ranks of the down projection's output per image, "
        "the rest scaled by 1/(1-p), as sd-scripts' networks.lora. 0: off.",
    )


def _conv_rank_field(default: int, low: int) -> Any:
    return Field(
        default, ge=low, le=1024,
        description="Rank on the ResNet blocks' 3x3 convolutions (kohya's conv_dim); their Linear and 1x1 layers "
        "get network.rank." + (" 0 = no convolution layers." if low == 0 else ""),
    )


def _conv_alpha_field(default: float) -> Any:
    return Field(default, gt=0, le=4096, description="Alpha of the convolution layers (kohya's conv_alpha).")


def _tucker_field() -> Any:
    return Field(
        False, description="Tucker decomposition of the 3x3 convolutions (LyCORIS use_tucker): smaller files for conv layers."
    )


class LoRANetwork(NetworkBase):
    type: Literal["lora"] = Field("lora", description="Network type: lora, locon, loha, lokr or dora.")
    dropout: float = _dropout_field()
    rank_dropout: float = _rank_dropout_field()


class LoConNetwork(NetworkBase):
    type: Literal["locon"] = "locon"
    dropout: float = _dropout_field()
    rank_dropout: float = _rank_dropout_field()
    conv_rank: int = _conv_rank_field(8, 1)
    conv_alpha: float = _conv_alpha_field(1.0)


class LoHaNetwork(NetworkBase):
    type: Literal["loha"] = "loha"
    rank: int = Field(8, ge=1, le=1024, description="Rank (network_dim) of each of LoHa's two factor pairs.")
    alpha: float = Field(8.0, gt=0, le=4096, description="Alpha (network_alpha). The update is scaled by alpha/rank.")
    conv_rank: int = _conv_rank_field(0, 0)
    conv_alpha: float = _conv_alpha_field(1.0)
    use_tucker: bool = _tucker_field()


class LoKrNetwork(NetworkBase):
    type: Literal["lokr"] = "lokr"
    rank: int = Field(
        8, ge=1, le=1024,
        description="Rank (network_dim) of the decomposed Kronecker factor; a factor this rank cannot shrink is kept whole.",
    )
    alpha: float = Field(8.0, gt=0, le=4096, description="Alpha (network_alpha). The update is scaled by alpha/rank.")
    conv_rank: int = _conv_rank_field(0, 0)
    conv_alpha: float = _conv_alpha_field(1.0)
    lokr_factor: int = Field(
        -1, ge=-1, le=8192,
        description="LoKr factor (kohya's factor): the size of the small Kronecker factor; -1 = automatic (the most square split).",
    )
    decompose_both: bool = Field(False, description="Also decompose the small Kronecker factor (LyCORIS decompose_both).")
    use_tucker: bool = _tucker_field()

    @field_validator("lokr_factor")
    @classmethod
    def _factor(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must be -1 (automatic) or a positive factor; got 0")
        return v


class DoRANetwork(NetworkBase):
    type: Literal["dora"] = "dora"
    dropout: float = _dropout_field()
    rank_dropout: float = _rank_dropout_field()
    conv_rank: int = _conv_rank_field(0, 0)
    conv_alpha: float = _conv_alpha_field(1.0)


def _network_tag(v: Any) -> str:
    """The network type of a section; an old config without `type` is a plain LoRA."""
    if isinstance(v, dict):
        return v.get("type", "lora")
    return getattr(v, "type", "lora")


NetworkConfig = Annotated[
    Annotated[LoRANetwork, Tag("lora")] | Annotated[LoConNetwork, Tag("locon")] | Annotated[LoHaNetwork, Tag("loha")]
    | Annotated[LoKrNetwork, Tag("lokr")] | Annotated[DoRANetwork, Tag("dora")],
    Discriminator(_network_tag),
]


NETWORK_HASH_NEUTRAL = {"type": "lora", "network_weights": None, "rank_dropout": 0.0, "module_dropout": 0.0}
# added after schema 1, see config_hash
