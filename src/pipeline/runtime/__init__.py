"""What the service runs, without torch: the bento ships this folder and nothing else of ``pipeline``.

- ``imaging``: one ``decode_image`` for training and serving;
- ``onnx_model``: the exported classifier under ONNX Runtime;
- ``explainer`` and ``pictures``: the explain graph's outputs as PNGs (numpy + Pillow);
- ``http``: bounded bodies, multipart parsing, micro-batching, the route table and JSON errors;
- ``settings``: every ``CLASSIFIER_*`` variable, read once and checked.

``tests/test_runtime.py`` imports it with torch blocked.
"""
