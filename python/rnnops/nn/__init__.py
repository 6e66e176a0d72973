"""Drop-in ``torch.nn`` modules backed by rnnops ops."""
from .rnn import GRU, LSTM

__all__ = ["GRU", "LSTM"]
