"""An interactive routing explorer for notebooks: pick a picture and a prompt, watch the experts.

    from ernie_lab.widgets import RoutingExplorer
    explorer = RoutingExplorer(model, tokenizer)     # any ERNIE 4.5 VL (or text MoE) model
    explorer      # the live widget; where widgets do not render, a static picture of its first view

A thin layer over ``ernie_lab.viz``: every control changes a :class:`View` (which picture, layer,
modality, rank, position), :func:`draw` turns a routed prompt and a view into a Figure, and the
widget puts that figure's PNG into one ``ipywidgets.Image``, replaced in place (no flicker, no
JavaScript beyond ipywidgets' own). A new picture or prompt runs the model once (``viz.route``)
and asks it for an answer (``ernie_lab.chat``); moving a slider only redraws. The position slider
selects one image token or text token; its experts and weights in every layer are listed above
the picture, which takes the notebook's full width.

Pictures reach the model as it was trained on them: the tiny VL model saw every scene and photograph
squeezed to 112 x 112 (``scenes.IMAGE_SIZE``; ``tiny.models.photo_images``), so the explorer squeezes
each picture the same way (``model_picture``). For a real checkpoint pass ``image_size=None``: the
picture keeps its shape, shrunk to at most 448 pixels a side.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import viz
from ..errors import ErnieLabError, InputError
from ..model.special_tokens import TEXT, VISION

VIEWS = ("patch overlay", "token strip", "load heatmap", "specialisation")


@dataclass(frozen=True)
class View:
    """What the explorer shows: one of VIEWS, a decoder layer, a group, a top-k rank, a selected position."""

    name: str = "patch overlay"
    layer: int | None = None      # decoder layer of an MoE block (None: the first)
    modality: int = VISION        # the group the position slider walks: VISION (patches) or TEXT (tokens)
    rank: int = 0                 # 0: the top-1 expert, 1: the second choice, ...
    position: int = 0             # index among the image tokens (VISION) or text tokens (TEXT)


def selected_row(routed: viz.Routed, view: View) -> int | None:
    """The record row of the selected image or text token (None when there is none of that kind)."""
    if not isinstance(view, View):
        raise InputError(f"view must be a widgets.View, got {type(view).__name__}; e.g. View(name='token strip').")
    rows = routed.image_rows if view.modality == VISION else routed.text_rows
    if len(rows) == 0:
        return None
    return int(rows[min(max(view.position, 0), len(rows) - 1)])


def draw(routed: viz.Routed, view: View, specialisation=None):
    """The Figure of ``view`` for one routed prompt; ``specialisation`` is (record, rows, labels, group)."""
    if not isinstance(routed, viz.Routed):
        raise InputError(f"routed must be a viz.Routed (what viz.route returns), got {type(routed).__name__}.")
    if not isinstance(view, View):
        raise InputError(f"view must be a widgets.View, got {type(view).__name__}; e.g. View(name='token strip').")
    if view.name not in VIEWS:
        raise InputError(f"view must be one of {VIEWS}, got {view.name!r}.")
    if isinstance(view.position, bool) or not isinstance(view.position, int):
        raise InputError(f"view.position must be an int, got {view.position!r}.")
    if view.name == "patch overlay":
        if routed.image is None:
            raise InputError("this prompt has no picture: choose the token strip, or give the model an image.")
        cell = max(0, min(view.position, len(routed.image_rows) - 1)) if view.modality == VISION else None
        return viz.patch_overlay(routed.record, routed.image, routed.grid, routed.image_rows, layer=view.layer,
                                 rank=view.rank, selected=cell)
    if view.name == "token strip":
        chosen = max(0, min(view.position, len(routed.text_rows) - 1)) if view.modality == TEXT else None
        return viz.token_strip(routed.record, routed.tokens, routed.text_rows, rank=view.rank, selected=chosen,
                               highlight=view.layer)
    if view.name == "load heatmap":
        return viz.load_heatmap(routed.record, title="Expert load of this prompt, per MoE layer")
    if specialisation is None:
        raise InputError("the specialisation view needs routed examples: pass specialisation=(record, rows, labels, group).")
    if not isinstance(specialisation, (tuple, list)) or len(specialisation) != 4:
        raise InputError("specialisation must be (record, rows, labels, group), as "
                         "RoutingExplorer.specialisation_data returns.")
    record, rows, labels, group = specialisation
    return viz.specialisation(record, rows, labels, group=group, rank=view.rank, layer=view.layer)


def bundled_images(count: int = 6) -> dict[str, object]:
    """Pictures to choose from: ``count`` held-out scenes (named by their caption) and the bundled photographs."""
    from ..tiny import scenes
    from ..tiny.models import held_out_scenes

    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 100:
        raise InputError(f"bundled_images: count (held-out scenes to offer) must be an integer in [0, 100], got "
                         f"{count!r}.")
    images = {}
    for n, scene in enumerate(held_out_scenes(count), 1):
        images[f"scene {n}: {scenes.caption(scene).split(': ', 1)[1][:48]}"] = scenes.render(scene)
    try:
        images.update({f"photo: {p.name}": p.image for p in scenes.photos()})
    except InputError:  # scikit-image missing: the scenes are enough
        pass
    return images


def model_picture(image, size: int | None = 112):  # 112 = tiny.scenes.IMAGE_SIZE
    """The picture the model is given: squeezed to ``size`` x ``size`` as the tiny VL model was trained
    (every picture it saw was resized so, whatever its shape); ``size=None`` keeps the shape, shrunk to
    at most 448 pixels a side (for a real checkpoint, whose processor takes any shape)."""
    check_image_size(size)
    if size is None:
        return shrink(image, 448)
    return rgb(image).resize((size, size))


def shrink(image, longest: int = 224):
    """The picture scaled down (never up) so its longer side is at most ``longest`` pixels: fast to route."""
    if isinstance(longest, bool) or not isinstance(longest, int) or longest < 28:
        raise InputError(f"longest must be an integer number of pixels >= 28, got {longest!r}.")
    image = rgb(image)
    scale = longest / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(28, round(image.width * scale)), max(28, round(image.height * scale))))


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 28, 2048  # one merged token a side .. far beyond what routing needs


def check_image_size(size) -> None:
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise InputError(f"image_size must be None (keep the shape) or an integer number of pixels from "
                         f"{MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (112 for the tiny VL model), got {size!r}.")


def rgb(image):
    """An RGB copy of a PIL picture, transparency on white (as the processor reads it); else an InputError."""
    from PIL import Image

    from ..io.image_processing import to_rgb

    if not isinstance(image, Image.Image):
        raise InputError(f"image must be a PIL picture, got {type(image).__name__}; open a file with "
                         "PIL.Image.open(path), an array with PIL.Image.fromarray(array).")
    if min(image.size) < 1:
        raise InputError(f"image of {image.width}x{image.height} pixels is empty; give a picture with pixels.")
    return to_rgb(image)


def upload_picture(name: str, content) -> object:
    """The picture in an uploaded file's bytes (``image_processing.open_image``: its size is checked from the
    header before it is decoded), as RGB."""
    from ..io.image_processing import open_image

    if content is not None and not isinstance(content, (bytes, bytearray, memoryview)):
        raise InputError(f"the upload {name!r} must be the file's bytes (the FileUpload value's 'content'), got "
                         f"{type(content).__name__}; for a file on disk use its path instead.")
    if not content:
        raise InputError(f"the upload {name!r} is empty (0 bytes); choose the picture file again.")
    return rgb(open_image(bytes(content), name=f"the upload {name!r}"))


def uploaded_files(value) -> list[tuple[str, object]]:
    """(name, content) of each file of a FileUpload value: ipywidgets 8 (a tuple of dicts) or 7 (a dict by name)."""
    if not value:
        return []
    if isinstance(value, dict):  # ipywidgets 7: {name: {"metadata": ..., "content": bytes}}
        return [(str(name), item.get("content") if isinstance(item, dict) else None) for name, item in value.items()]
    files = []
    for item in value:
        if not isinstance(item, dict):
            raise InputError(f"an upload must be a file entry with a name and content, got {type(item).__name__}.")
        files.append((str(item.get("name", "picture")), item.get("content")))
    return files


def check_explorer_args(model, tokenizer, images, prompt, max_new_tokens, image_size, dpi, spec_scenes) -> None:
    """Refuse bad explorer arguments before any widget is built or the model runs."""
    import torch

    from . import routing

    if not isinstance(model, torch.nn.Module) or not callable(getattr(getattr(model, "config", None),
                                                                      "get_text_config", None)):
        raise InputError(f"model must be an ernie-lab ERNIE 4.5 MoE or VL model, got {type(model).__name__}; load one "
                         "with ernie_lab.load_model(folder) (a transformers model: load its folder with the kit).")
    if not routing.taps(model):
        raise InputError("model: this model has no MoE layers; the explorer needs an ERNIE 4.5 MoE or VL model.")
    viz.check_tokenizer(tokenizer, "apply_chat_template", "encode")
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f"prompt must be a str or None, got {type(prompt).__name__}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 4096:
        raise InputError(f"max_new_tokens must be an integer from 1 to 4096, got {max_new_tokens!r}.")
    check_image_size(image_size)
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not 10 <= dpi <= 600:
        raise InputError(f"dpi must be a number from 10 to 600 (100 suits a screen), got {dpi!r}.")
    if isinstance(spec_scenes, bool) or not isinstance(spec_scenes, int) or not 1 <= spec_scenes <= 1000:
        raise InputError(f"spec_scenes must be an integer from 1 to 1000, got {spec_scenes!r}.")
    if images is not None:
        if not isinstance(images, dict) or not images:
            raise InputError("images must be a non-empty dict {name: PIL picture}, or None for the bundled ones, "
                             f"got {type(images).__name__}.")
        for name, image in images.items():
            if not isinstance(name, str):
                raise InputError(f"images: every name must be a str, got {name!r}.")
            try:
                rgb(image)
            except InputError as error:
                raise InputError(f"images[{name!r}]: {error}") from None


class RoutingExplorer:
    """Choose a picture (bundled or uploaded) and a prompt, a layer, a group, a rank and a view; the
    picture redraws in place, the selected token's experts per layer are listed, the model answers."""

    def __init__(self, model, tokenizer, images: dict | None = None, prompt: str | None = None,
                 max_new_tokens: int = 64, image_size: int | None = 112, dpi: int = 100, spec_scenes: int = 16):
        check_explorer_args(model, tokenizer, images, prompt, max_new_tokens, image_size, dpi, spec_scenes)
        import ipywidgets as w

        from ..tiny import scenes

        self.model, self.tokenizer = model, tokenizer
        self.image_size = image_size  # 112 = scenes.IMAGE_SIZE, what the tiny VL model was trained on
        self.max_new_tokens, self.dpi, self.spec_scenes = max_new_tokens, dpi, spec_scenes
        self.is_vl = hasattr(model.config, "vision")
        self.images = (images or bundled_images()) if self.is_vl else {}
        self._specialisation: dict[int, tuple] = {}
        self._quiet = False  # True while the explorer itself moves a slider
        self.view = View(modality=VISION if self.is_vl else TEXT, name="patch overlay" if self.is_vl else "token strip")

        self.picture = w.Image(format="png", layout=w.Layout(width="100%", object_fit="contain"))
        self.answer = w.HTML()
        self.status = w.HTML()  # what went wrong in the last action (an unreadable upload, ...); empty when all is well
        self.experts = w.HTML(layout=w.Layout(min_width="260px"))
        self.image_pick = w.Dropdown(options=list(self.images), description="picture", layout=w.Layout(width="420px"))
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="upload")
        self.prompt = w.Text(value=prompt or scenes.DESCRIBE, description="prompt", continuous_update=False,
                             layout=w.Layout(width="420px"))
        self.view_pick = w.ToggleButtons(options=VIEWS if self.is_vl else VIEWS[1:3], value=self.view.name,
                                         description="view")
        layers = [(str(tap.layer_idx), tap.layer_idx) for tap in self._probe_layers()]
        self.layer = w.SelectionSlider(options=layers, value=layers[0][1], description="layer")
        groups = [("vision (patches)", VISION), ("text (tokens)", TEXT)] if self.is_vl else [("text (tokens)", TEXT)]
        self.modality = w.ToggleButtons(options=groups, value=self.view.modality, description="modality")
        self.rank = w.IntSlider(min=0, max=model.config.get_text_config().moe_k - 1, value=0, description="top-k rank")
        self.position = w.IntSlider(min=0, max=0, value=0, description="position")
        for control in (self.view_pick, self.layer, self.modality, self.rank, self.position):
            control.observe(self._on_view, names="value")
        for control in (self.image_pick, self.prompt):
            control.observe(self._on_input, names="value")
        self.upload.observe(self._on_upload, names="value")
        inputs = [self.image_pick, self.upload] if self.is_vl else []
        controls = w.VBox([*inputs, self.prompt, self.view_pick, self.modality],
                          layout=w.Layout(flex="0 0 auto"))
        sliders = w.VBox([self.layer, self.rank, self.position], layout=w.Layout(flex="0 0 auto"))
        wrap = w.Layout(flex_flow="row wrap", align_items="flex-start", gap="4px 24px")
        top = w.HBox([controls, sliders, self.experts], layout=wrap)
        # controls, sliders and the selected token's experts on top; the answer; the picture at full width
        self.widget = w.VBox([top, self.status, self.answer, self.picture], layout=w.Layout(width="100%"))
        self._route(self.images[self.image_pick.value] if self.is_vl else None)

    # ---------------------------------------------------------------------------- state -> picture
    def _probe_layers(self):
        """The model's MoE layers (their routing taps), in depth order."""
        from . import routing

        taps = routing.taps(self.model)
        if not taps:
            raise InputError("this model has no MoE layers; the explorer needs an ERNIE 4.5 MoE or VL model.")
        return taps

    def _route(self, image) -> None:
        """Run the model on the current picture and prompt, answer, and redraw."""
        import html

        from ..io.chat import chat

        picture = model_picture(image, self.image_size) if image is not None else None
        routed = viz.route(self.model, self.tokenizer, self.prompt.value, picture)
        reply = chat(self.model, self.tokenizer, viz.messages_for(self.prompt.value, picture),
                     max_new_tokens=self.max_new_tokens)
        self.image, self.routed = picture, routed  # only once both succeeded: a failure leaves the last view
        self.answer.value = f"<b>model's answer:</b> {html.escape(reply) or '(nothing)'}"
        self._sync_position()
        self.refresh()

    def _sync_position(self) -> None:
        """Fit the position slider to the tokens of the chosen group (without a redraw of its own)."""
        rows = self.routed.image_rows if self.view.modality == VISION else self.routed.text_rows
        self._quiet = True
        try:
            self.position.max = max(len(rows) - 1, 0)
        finally:
            self._quiet = False
        self.view = replace(self.view, position=self.position.value)

    def figure(self):
        """The current view's Figure (``draw`` of the routed prompt)."""
        spec = self.specialisation_data(self.view.modality) if self.view.name == "specialisation" else None
        return draw(self.routed, self.view, spec)

    def refresh(self) -> None:
        """Redraw the picture and the selected token's experts in place."""
        try:
            self.picture.value = viz.png(self.figure(), dpi=self.dpi)
        except InputError as error:
            self.picture.value = message_png(str(error))
        row = selected_row(self.routed, self.view)
        if row is None:
            self.experts.value = "<i>no token of this kind</i>"
            return
        kind = "image token" if self.view.modality == VISION else f"text token {self.routed.tokens[row]!r}"
        self.experts.value = (f"<b>{kind}</b> (position {self.view.position}, row {row})<br>experts and weights:"
                              f"<pre class='ernie-path'>{viz.path_table(self.routed.record, row)}</pre>")

    def snapshot(self) -> bytes:
        """PNG of what the widget shows now: the static picture for notebooks opened without widgets."""
        return bytes(self.picture.value)

    def specialisation_data(self, group: int):
        """(record, rows, labels, group), routed once: held-out scenes for the vision group, word classes
        of the scenes' captions and the prompt for the text group."""
        if group not in self._specialisation:
            from ..tiny import scenes
            from ..tiny.models import held_out_scenes

            chosen = held_out_scenes(self.spec_scenes)
            if group == VISION:
                record, rows, labels = viz.route_scenes(self.model, self.tokenizer, chosen)
            else:
                texts = [scenes.caption(s) + "." for s in chosen] + [self.prompt.value]
                record, rows, classes = viz.route_texts(self.model, self.tokenizer, texts)
                labels = {"word class": classes}
            self._specialisation[group] = (record, rows, labels, group)
        return self._specialisation[group]

    # ---------------------------------------------------------------------------- events
    def show_error(self, text: str) -> None:
        """Say what went wrong in the widget itself (a callback's exception would be lost in the log)."""
        import html

        self.status.value = f"<span style='color:#b00020'><b>ernie-lab:</b> {html.escape(text)}</span>"

    def _guarded(self, action, change) -> None:
        """Run an event handler; a kit error is shown in the widget, any other also shown, then raised."""
        try:
            action(change)
        except ErnieLabError as error:
            self.show_error(str(error))
        except Exception as error:
            self.show_error(f"unexpected {type(error).__name__}: {error}")
            raise
        else:
            self.status.value = ""

    def _on_view(self, change) -> None:
        self._guarded(self._view_changed, change)

    def _on_input(self, change) -> None:
        self._guarded(self._input_changed, change)

    def _on_upload(self, change) -> None:
        self._guarded(self._uploaded, change)

    def _view_changed(self, change) -> None:
        if self._quiet:
            return
        self.view = replace(self.view, name=self.view_pick.value, layer=self.layer.value, modality=self.modality.value,
                            rank=self.rank.value, position=self.position.value)
        if change["owner"] is self.modality:
            self._sync_position()
        self.refresh()

    def _input_changed(self, change) -> None:
        self._route(self.images[self.image_pick.value] if self.is_vl else None)

    def _uploaded(self, change) -> None:
        files = uploaded_files(change["new"])
        if not files:
            return
        filename, content = files[0]
        image = upload_picture(filename, content)  # refused here leaves the dropdown as it was
        if not self.is_vl:
            raise InputError(f"the upload {filename!r}: this model is text-only and cannot see pictures; load an "
                             "ERNIE 4.5 VL model.")
        name = f"upload: {filename}"
        self._route(image)  # the model sees it before it joins the list: a failure adds nothing
        self.images[name] = image
        self._quiet_pick(name)

    def _quiet_pick(self, name: str) -> None:
        """Put ``name`` in the picture dropdown and select it without routing it again."""
        self.image_pick.unobserve(self._on_input, names="value")
        try:
            self.image_pick.options = list(self.images)
            self.image_pick.value = name
        finally:
            self.image_pick.observe(self._on_input, names="value")

    def _repr_mimebundle_(self, **kwargs):
        """The live widget, with a PNG of what it shows now as the fallback in the same output: JupyterLab
        shows the widget alone; GitHub, nbviewer and the HTML site (no widgets) show the PNG."""
        import base64

        bundle = self.widget._repr_mimebundle_(**kwargs)
        data = dict(bundle[0] if isinstance(bundle, tuple) else bundle)
        data["image/png"] = base64.b64encode(self.snapshot()).decode("ascii")
        return data


def message_png(text: str) -> bytes:
    """A small PNG that says ``text`` (shown where a view does not apply)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 1.2))
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return viz.png(fig, dpi=90)
