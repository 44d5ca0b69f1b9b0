"""The driving-video face front end of FlashPortrait: detector, 222-point landmarks, tracker, PD-FGC alignment.

Everything here works on BGR uint8 frames (the layout the published ONNX networks were trained on) and matches the
reference pipeline numerically (golden set `flashportrait_face`). `avatarcli.features.expression` puts the parts
together and adds the PD-FGC encoder.
"""
