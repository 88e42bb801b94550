"""Where ``FlurkaAttention`` lived before it moved to ``flurka_rewrite.kernels.attention``:
kept so that models pickled with ``torch.save`` by earlier versions still load."""
from flurka_rewrite.kernels.attention import *  # noqa: F403
from flurka_rewrite.kernels.attention import FlurkaAttention, MASKED_BELOW  # noqa: F401
