"""noah-jax: the NOAH classification head and its model zoo in JAX/Flax linen."""

import os

# TensorFlow only reads and augments images here (the models run in JAX), and its C++
# start-up notices are not for the user. Set before any module of this package can
# import TensorFlow (TFDS, CLU's writers, the input pipeline); a value the user set
# is kept.
# - TF_CPP_MIN_LOG_LEVEL=1 holds back TensorFlow's C++ INFO lines (the CPU feature
#   notice); its warnings and errors still print.
# - TF_ENABLE_ONEDNN_OPTS=0: TensorFlow 2.21 prints "oneDNN custom operations are on"
#   (twice, each after absl's "All log messages before absl::InitializeLog() is called
#   are written to STDERR") whatever TF_CPP_MIN_LOG_LEVEL says, and only when those
#   operations are on. They are fast kernels for convolutions and matrix products,
#   which the input pipeline does not need: its decoding, resizing, crops and colour
#   operations (the depthwise blur of `sharpness` included) give the same bytes either
#   way, and the demo the same metrics at every step.
# A command whose TensorFlow lines only repeat its own (predict) sets a quieter level
# where the user set none; this remembers which the user set.
TF_SETTINGS_FROM_USER = frozenset(name for name in ("TF_CPP_MIN_LOG_LEVEL",
                                                    "TF_ENABLE_ONEDNN_OPTS")
                                  if name in os.environ)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
