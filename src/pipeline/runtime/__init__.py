"""What the service runs, without torch: the bento ships this folder and nothing else of ``pipeline``.

- ``imaging``: one ``decode_image`` for training and serving;
- ``model_folder``: the model's files, their checksums, the probe check, the ONNX Runtime session;
- ``model_uri``: the ``models:/`` URIs the tools accept;
- ``onnx_model``: the exported classifier under ONNX Runtime;
- ``explainer`` and ``pictures``: the explain graph's outputs as PNGs (numpy + Pillow);
- ``follower``: follows a registry alias over plain HTTP and swaps checked models in;
- ``bodies``, ``batching``, ``deadline``, ``routes``: bounded bodies and multipart parsing,
  micro-batching, the 504 deadline, and the route table with its JSON errors and OpenAPI;
- ``settings``: every ``CLASSIFIER_*`` variable, read once and checked.

``tests/test_runtime.py`` imports it with torch blocked.
"""
