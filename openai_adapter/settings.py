"""Adapter configuration: one settings object read from ``QWEN_ADAPTER_*`` variables."""

from __future__ import annotations

import re
from functools import cached_property

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from predictors.contract import EDIT_MODEL_NAME, GENERATION_MODEL_NAME

# An entry of image_url_hosts: a host name or IPv4 address, or "*." and a domain.
_HOST = re.compile(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


class Settings(BaseSettings):
    """Where the predictors are and how the adapter talks to them and to its clients."""

    model_config = SettingsConfigDict(env_prefix="QWEN_ADAPTER_", frozen=True)

    generation_url: str = Field(
        "http://127.0.0.1:8081",
        description="Base URL of the text-to-image predictor; empty switches the model off.",
    )
    edit_url: str = Field(
        "http://127.0.0.1:8082",
        description="Base URL of the image-edit predictor; empty switches the model off.",
    )
    generation_model: str = Field(
        GENERATION_MODEL_NAME, description="Model id of the text-to-image predictor."
    )
    edit_model: str = Field(EDIT_MODEL_NAME, description="Model id of the image-edit predictor.")
    generation_model_aliases: list[str] = Field(
        [],
        description="Other names that a generation's 'model' may give the text-to-image "
        "model (JSON list), e.g. OpenAI's model names that existing clients send.",
    )
    edit_model_aliases: list[str] = Field(
        [], description="The same for the image-edit model and edits."
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, clients must send 'Authorization: Bearer <key>' with this key, "
        "or with one of several keys separated by commas (to rotate keys without downtime: "
        "add the new key, move the clients to it, drop the old one).",
    )
    cors_origins: list[str] = Field(
        [],
        description="Web origins (e.g. 'https://app.example.com', or '*') whose browser "
        "pages may call the API, by CORS (JSON list). Empty: no CORS headers.",
    )
    request_timeout_seconds: float = Field(
        570.0,
        gt=0,
        description="Longest time a request takes, from its arrival to its answer's end: a "
        "body not in by then gets a 408, a predictor's answer not complete a 504 (a stream: "
        "an error event). Below the clients' own timeout (the openai SDK's is 600 s), or they "
        "give up and resend first.",
    )
    connect_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="Longest wait to connect to a predictor, or for a free pooled connection "
        "to one (then 503).",
    )
    ready_timeout_seconds: float = Field(
        2.0, gt=0, description="Longest wait for a predictor's readiness answer."
    )
    max_connections: int = Field(
        64,
        ge=1,
        description="Most open (pooled, reused) connections to each predictor; a request that "
        "finds them all busy waits for one up to the connect timeout.",
    )
    retry_after_seconds: int = Field(5, ge=0, description="Retry-After sent with 503 answers.")
    body_idle_timeout_seconds: float = Field(
        60,
        gt=0,
        description="Longest wait for more of a request body before its end; a body that "
        "stalls longer gets a 408 (it would hold its share of the upload budget meanwhile).",
    )
    body_min_rate_bytes_per_second: float = Field(
        8192,
        ge=0,
        allow_inf_nan=False,
        description="Slowest average pace of a request body, past its first idle timeout: "
        "the body must have arrived within that timeout plus one second per this many bytes "
        "received, else a 408, so that a body trickled in cannot hold its share of the upload "
        "budget for hours. 0: no minimum.",
    )
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest accepted edit upload: its images together."
    )
    max_upload_bytes_in_flight: int = Field(
        512 * 1024 * 1024,
        ge=1,
        description="Most bytes of edit bodies held at once (their Content-Length, and the "
        "images fetched from URLs); an edit that would pass it, while others are held, gets a "
        "retryable 503 (before its body is read, or while it fetches).",
    )
    image_url_hosts: list[str] = Field(
        [],
        description="Hosts (a name or IPv4 address, or '*.example.com' for the subdomains of "
        "example.com) whose http(s) URLs a JSON edit may give as an image; the adapter "
        "fetches them (JSON list). Empty: images come as data URLs or files only.",
    )
    image_url_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Longest time to fetch all the image URLs of one request, one after "
        "another (then 400).",
    )
    quality_steps: dict[str, int] = Field(
        {"low": 20, "medium": 30, "high": 50, "hd": 50, "xhigh": 75, "max": 100},
        description="num_inference_steps for each OpenAI 'quality' (JSON object; 'auto' also "
        "applies when no quality is sent); a quality not listed uses the predictor's default.",
    )
    model_quality_steps: dict[str, dict[str, int]] = Field(
        {},
        description="Quality tables of single models, replacing quality_steps for them (JSON "
        "object: model id -> table). {} leaves every quality to the predictor's default, as a "
        "model with a step-distilled LoRA needs.",
    )

    @field_validator("image_url_hosts")
    @classmethod
    def _are_hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not _HOST.fullmatch(host):
                raise ValueError(
                    f"{host!r} is not a host name, an IPv4 address or '*.' and a domain"
                )
        return [host.lower() for host in hosts]

    @model_validator(mode="after")
    def _names_are_distinct(self) -> Settings:
        if self.generation_model == self.edit_model:
            raise ValueError(
                f"both models have the id {self.edit_model!r}: the adapter tells them apart by id"
            )
        models = {self.generation_model, self.edit_model}
        for alias in (*self.generation_model_aliases, *self.edit_model_aliases):
            if alias in models:
                raise ValueError(f"the alias {alias!r} is a model's id")
        return self

    @field_validator("api_key")
    @classmethod
    def _holds_a_key(cls, api_key: SecretStr | None) -> SecretStr | None:
        if api_key is not None and not _keys(api_key):
            raise ValueError("holds no key: unset it to switch authentication off")
        return api_key

    @cached_property
    def api_keys(self) -> list[str]:
        """The keys that clients may send; none when authentication is off (read once, not
        at every request)."""
        return _keys(self.api_key) if self.api_key is not None else []

    @field_validator("generation_url", "edit_url")
    @classmethod
    def _strip_slash(cls, url: str) -> str:
        return url.strip().rstrip("/")

    def predictor_url(self, model: str) -> str | None:
        """The base URL serving ``model``, or None when no enabled predictor serves it."""
        urls = {self.generation_model: self.generation_url, self.edit_model: self.edit_url}
        return urls.get(model) or None

    def aliases(self, model: str) -> list[str]:
        """The other names that requests may give ``model``, when it is enabled."""
        if not self.predictor_url(model):
            return []
        return {
            self.generation_model: self.generation_model_aliases,
            self.edit_model: self.edit_model_aliases,
        }.get(model, [])

    def quality_table(self, model: str) -> dict[str, int]:
        """The quality -> num_inference_steps table that applies to ``model``."""
        return self.model_quality_steps.get(model, self.quality_steps)

    @property
    def models(self) -> list[str]:
        """The ids of the enabled models."""
        return [m for m in (self.generation_model, self.edit_model) if self.predictor_url(m)]


def _keys(api_key: SecretStr) -> list[str]:
    return [key.strip() for key in api_key.get_secret_value().split(",") if key.strip()]
