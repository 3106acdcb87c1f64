"""The SRMF Processing algorithms: each declares parameters and builds a job for the engine."""
from .evaluate import EvaluateAlgorithm
from .finetune import FinetuneAlgorithm
from .findclass import FindClassAlgorithm, FindClassHandoffAlgorithm
from .modelinfo import ModelInfoAlgorithm
from .pretrain import PretrainAlgorithm
from .segment import SegmentAlgorithm

ALGORITHMS = (SegmentAlgorithm, FinetuneAlgorithm, EvaluateAlgorithm, FindClassAlgorithm, FindClassHandoffAlgorithm,
              ModelInfoAlgorithm, PretrainAlgorithm)
