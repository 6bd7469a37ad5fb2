"""Methods: a registry of comparable entries, each a localizer and/or a segmenter
(:mod:`rau.methods.interfaces`), built by :func:`create_method` (:mod:`rau.methods.registry`) from
typed options (:mod:`rau.methods.options`)."""

from rau.methods.interfaces import Localization, Localizer, Method, SegmentationOutput, Segmenter
from rau.methods.registry import DEFAULT_METHOD, METHODS, create_method, describe_methods, method_options

__all__ = ["DEFAULT_METHOD", "METHODS", "Localization", "Localizer", "Method", "SegmentationOutput", "Segmenter",
           "create_method", "describe_methods", "method_options"]
