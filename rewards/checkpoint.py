"""What the rewards that score with a trained model share (`genrm`, `scalar_rm`): the checkpoint is loaded once,
lazily on the first call, and dropped when the reward is pickled, so an instance can be shipped to a Ray actor before
or after use. Without a `path` the RL stage fills in this run's `rm` stage output (`run_output`)."""

from __future__ import annotations


class CheckpointReward:
    """path: the model's checkpoint directory (None: this run's `rm/<run_output>`); batch_size: sequences per
    forward pass; device: where the model runs ("cpu", "cuda", "cuda:N")."""

    run_output = ""  # the rm stage's output directory the reward reads when `path` is unset
    auto_class = None  # the transformers class to load with (None: a causal LM)

    def __init__(self, path: str | None = None, batch_size: int = 32, device: str = "cpu"):
        self.path = None if path is None else str(path)
        self.batch_size = int(batch_size)
        self.device = device
        self._model = None
        self._tokenizer = None

    def __getstate__(self):
        return {**self.__dict__, "_model": None, "_tokenizer": None}

    def _load(self):
        """(model in eval mode, tokenizer), loaded on the first call."""
        if self._model is None:
            from posttrain.model import load_model, load_tokenizer

            if self.path is None:
                raise ValueError(f"reward {self.reward_name!r}: no checkpoint path (set params.path, or run the rm "
                                 f"stage before the RL stage so that rm/{self.run_output} exists)")
            self._tokenizer = load_tokenizer(self.path)
            extra = {} if self.auto_class is None else {"auto_class": self._auto_class(), "num_labels": 1}
            self._model = load_model(self.path, self.device, **extra)
            if self.auto_class is not None:
                self._model.config.pad_token_id = self._tokenizer.pad_token_id
            self._model.eval()
        return self._model, self._tokenizer

    def _auto_class(self):
        import transformers

        return getattr(transformers, self.auto_class)
