"""The Python API: load a checkpoint, answer interleaved prompts with text and images.

    import metamorph
    mm = metamorph.load("runs/toy")            # a training workdir or a converted checkpoint
    out = mm.generate(["Generate an image of a red circle."], max_new_tokens=96, seed=0)
    out[0].text, out[0].images[0]              # str, PIL.Image
    mm.generate(["What colour is the shape?"], images=[[pil_image]])
    mm.chat(messages)                          # multi-turn, images in and out
    mm.encode_image(img); mm.render(tokens)

``loading`` (``load``: which checkpoint, which visualizer), ``model`` (``MetaMorphModel``, the
facade, and ``Generation``, one answer), ``prompts`` (turns and messages -> tokenized
prompts, answers -> text). What becomes of an answer's images is its output route
(``metamorph.routes``).
"""
