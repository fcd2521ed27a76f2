"""Page 1: choose a model and data, choose what to sweep, run the analysis with live progress."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from analysis import charts
from analysis.results import TARGETS
from dashboard import derived, state, widgets
from dashboard.markup import code, escape

OUTPUT_MODES = {"exact": "exact", "estimated (fast)": "estimated"}  # label -> AnalysisConfig.output_metrics

st.title("Model & data")
st.caption("Which layers lose precision when quantized, and what it costs. Pick a model, pick formats, run.")

running = state.any_job_running()


def _config(values: dict):
    from analysis.config import AnalysisConfig

    weights = tuple(values["weights"])
    acts_chosen = list(values["acts"])
    acts = tuple(a for a in acts_chosen if a != "none")
    if "none" in acts_chosen and acts:
        raise ValueError("activation formats: choose 'none' on its own for a weight-only analysis")
    if not weights and not acts:
        raise ValueError("nothing to analyse: choose at least one weight or activation format")
    targets = tuple(t for t in values["targets"]
                    if (t != "weights" or weights) and (t != "activations" or acts) and (t != "both" or (weights and acts)))
    if not targets:
        raise ValueError("the chosen targets have no formats to try; add formats or targets")
    granularity = None if values["granularity"] == "per-channel" else values["granularity"]
    config = AnalysisConfig(
        weight_formats=weights, act_formats=acts, targets=targets, granularity=granularity,
        weight_calibration=values["wcal"], act_calibration=values["acal"],
        dynamic_activations=values["dynamic"], fold_batchnorm=values["fold"],
        num_samples=int(values["samples"]), cumulative=values["cumulative"],
        output_metrics=OUTPUT_MODES[values["output"]], device=values["device"], workers=int(values["workers"]),
    )
    if config.distributed:  # refused here, in one line (Ray missing, a GPU index), not by the worker
        from analysis.distributed import check_distributed

        check_distributed(config)
    return config


def _check_suffix(uploaded, allowed: tuple[str, ...], what: str) -> None:
    suffix = Path(uploaded.name).suffix.lower().lstrip(".")
    if suffix not in allowed:
        raise ValueError(f"{uploaded.name} is not a supported {what} file (.{suffix or '?'}); "
                         f"use {', '.join('.' + a for a in allowed)}")


def _factory_spec(values: dict) -> str:
    """The model-building function as `file.py:function` with an absolute path: the uploaded .py and
    the function named, or a file on the server (a relative path is taken from the server's folder)."""
    factory, code_file = (values["factory"] or "").strip(), values["factory_file"]
    if code_file is not None:
        _check_suffix(code_file, ("py",), "Python code")
        function = factory.rpartition(":")[2].strip()
        if not function.isidentifier():
            raise ValueError(f"name the function in {code_file.name} that returns the model (e.g. build_model) "
                             "in the function field")
        if not values["trust"]:
            raise ValueError(f"{code_file.name} is Python code that runs when the model loads: tick "
                             "'I trust this code' if you do")
        return f"{state.save_upload(code_file)}:{function}"
    if not factory:
        return ""
    head, sep, function = factory.rpartition(":")
    if not sep or not head.lower().endswith(".py"):
        raise ValueError(f"{factory} is not file.py:function; name the file and the function that returns "
                         "the model, e.g. models/net.py:build_model, or upload the .py file")
    return f"{state.server_path(head)}:{function}"


def _hf_inputs(values: dict) -> state.Inputs:
    """A Hugging Face model folder on the server, with uploaded data: named arrays (.npz ...) or text,
    tokenized with the folder's own tokenizer."""
    from analysis.loading.hf import has_tokenizer, is_model_dir, text_spec

    folder = state.server_path(values["hf_dir"].strip())
    if not is_model_dir(folder):
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json there); give the folder "
                         "save_pretrained wrote")
    if values["model_file"] is not None or values["factory_file"] is not None or (values["factory"] or "").strip():
        raise ValueError("a Hugging Face folder holds its own architecture and weights: clear the model file and "
                         "model-code fields")
    calib_file, eval_file = values["calib_file"], values["eval_file"]
    if calib_file is None:
        raise ValueError("upload calibration data: text (.txt), or arrays named after forward's parameters "
                         "(.npz with input_ids, attention_mask ...)")

    def data_spec(upload) -> str:
        _check_suffix(upload, state.DATA_UPLOAD_TYPES, "data")
        path = str(state.save_upload(upload))
        if not upload.name.lower().endswith(".txt"):
            return path
        if not has_tokenizer(folder):
            raise ValueError(f"{folder} has no tokenizer to turn {upload.name} into tokens; upload token arrays "
                             "(.npz with input_ids) instead")
        return text_spec(path, str(folder), int(values["seq_len"]))

    return state.Inputs(
        model_spec=str(folder), weights=None, data_spec=data_spec(calib_file),
        eval_spec=data_spec(eval_file) if eval_file is not None else None,
        task=None if values["task"] == "auto" else values["task"], label=folder.name,
        data_label=calib_file.name + (f" (eval: {eval_file.name})" if eval_file is not None else ""),
    )


def _upload_inputs(values: dict) -> state.Inputs:
    if (values.get("hf_dir") or "").strip():
        return _hf_inputs(values)
    model_file, trust = values["model_file"], values["trust"]
    factory = _factory_spec(values)
    calib_file, eval_file = values["calib_file"], values["eval_file"]
    if model_file is None and not factory:
        raise ValueError("upload a model (.pt2, or a .safetensors/.pt state dict with the code that builds it) "
                         "or give the code that builds it (upload the .py, or name file.py:function)")
    weights = None
    if model_file is not None:
        _check_suffix(model_file, state.MODEL_UPLOAD_TYPES, "model")
    is_program = model_file is not None and model_file.name.lower().endswith(".pt2")
    if is_program and factory:
        raise ValueError("a .pt2 program holds its own architecture: clear the model-code fields")
    if model_file is not None and not is_program and not factory:
        raise ValueError(f"{model_file.name} holds weights only: upload the .py that builds the model "
                         "(or name file.py:function) and the function's name")
    if not trust:
        what = "a .pt2 program" if is_program else f"the factory {factory}"
        raise ValueError(f"loading {what} runs Python code: tick 'I trust this code' if you do")
    if calib_file is None:
        raise ValueError("upload calibration data: a .npz/.pt/.safetensors file with key 'inputs' (and 'labels')")
    _check_suffix(calib_file, state.DATA_UPLOAD_TYPES, "data")
    if eval_file is not None:
        _check_suffix(eval_file, state.DATA_UPLOAD_TYPES, "data")
    if is_program:
        model_spec = str(state.save_upload(model_file))
    else:
        model_spec = factory
        weights = str(state.save_upload(model_file)) if model_file is not None else None
    shown_factory = (f"{values['factory_file'].name}:{factory.rpartition(':')[2]}"
                     if values["factory_file"] is not None else factory)
    label = model_file.name if model_file is not None else shown_factory
    if model_file is not None and not is_program:
        label = f"{shown_factory} + {model_file.name}"
    inputs = state.Inputs(
        model_spec=model_spec, weights=weights, data_spec=str(state.save_upload(calib_file)),
        eval_spec=str(state.save_upload(eval_file)) if eval_file is not None else None,
        task=None if values["task"] == "auto" else values["task"], label=label,
        data_label=calib_file.name + (f" (eval: {eval_file.name})" if eval_file is not None else ""),
    )
    state.trust_code(model_spec)  # named here, with the box ticked: the one way code gets trusted
    return inputs


def _submit(source: str, values: dict) -> None:
    try:
        config = _config(values)
        inputs = state.sample_inputs(values["sample"]) if source == "sample" else _upload_inputs(values)
        job = state.start_job(inputs, config)
    except Exception as exc:  # noqa: BLE001 — one line; the earlier results stay selected
        st.error(escape(state.one_line(exc)))
        return
    state.attach_job(job)
    st.rerun()


left, right = st.columns([2, 3], gap="large")

with left:
    source = st.radio("Model source", ["sample", "upload"], horizontal=True, key="md_source",
                      format_func=lambda s: "Bundled sample" if s == "sample" else "Bring your own")
    values: dict = {}
    with st.form("analysis_form"):
        if source == "sample":
            samples = state.available_samples()
            usable = [n for n, why in samples.items() if why is None]
            if not usable:
                st.error("No bundled sample is available; rebuild them with python -m sample_models.train")
            preferred = state.default_sample() if state.default_sample() in usable else (usable or [None])[0]
            values["sample"] = st.selectbox("Sample model", usable, key="md_sample",
                                            index=usable.index(preferred) if preferred in usable else 0,
                                            format_func=lambda n: f"sample:{n}")
            missing = [f"sample:{n} — {why}" for n, why in samples.items() if why]
            if missing:
                st.caption("Not available: " + "; ".join(missing))
        else:
            values["model_file"] = st.file_uploader(
                "Model file: a saved program (.pt2) or trained weights (.safetensors / .pt)",
                key="md_model_file",
                help="A .pt2 is what torch.export.save writes: it holds the model's code and weights. Weights "
                     "alone (a state dict) also need the Python code that builds the model, below.")
            values["factory_file"] = st.file_uploader(
                "Code that builds the model (.py), for weights", key="md_factory_file", type=["py"],
                help="A Python file with a function that returns the model (an nn.Module) with freshly made "
                     "layers; the weights file then fills them. It is run as is: it may import installed "
                     "packages, not other files next to it on your machine.")
            values["factory"] = st.text_input(
                "Function that returns the model", key="md_factory", placeholder="build_model",
                help="Its name in the uploaded .py file. Without an upload: a file on the server as "
                     "file.py:function, e.g. models/net.py:build_model.")
            st.caption(f"A path on the server that does not start with / is taken from {code(Path.cwd())}, "
                       "the folder the dashboard was started in.")
            values["trust"] = st.checkbox("I trust this code (.pt2 programs and .py files run Python code)",
                                          key="md_trust")
            st.caption("Loading a .pt2 program runs Python that torch generates from the names inside it, and "
                       "the .py is your own Python: tick only for files you wrote or got from someone you "
                       "trust. The dashboard runs code only from a file you name here in this session, and only "
                       "while it is unchanged.")
            values["hf_dir"] = st.text_input(
                "…or a Hugging Face model folder on the server", key="md_hf_dir",
                placeholder="models/my-llama",
                help="The folder save_pretrained wrote (config.json + model.safetensors), loaded offline with the "
                     "transformers class its config names; folders that ship their own Python code are refused. "
                     "Leave the model file and code fields empty.")
            values["seq_len"] = st.number_input(
                "Tokens per sample, for text data", min_value=2, max_value=65536, value=128, step=16,
                key="md_seq_len", help="Text (.txt) calibration data is cut into samples of this many tokens, "
                "with the model folder's tokenizer; the labels are the next tokens.")
            values["calib_file"] = st.file_uploader(
                "Calibration data (.npz / .pt / .safetensors with 'inputs' — or arrays named after forward's "
                "parameters, e.g. input_ids and attention_mask — and optional 'labels'; or .txt for a Hugging "
                "Face folder)", key="md_calib_file")
            values["eval_file"] = st.file_uploader(
                "Evaluation data (optional; default: the calibration data)",
                key="md_eval_file")
            values["task"] = st.selectbox("Task", state.TASK_CHOICES, key="md_task",
                                          help="auto: class ids [N] → classification, [N, T] → language model")
        st.markdown("**What to try**")
        values["weights"] = st.multiselect("Weight formats", state.WEIGHT_FORMAT_CHOICES, default=["int8", "int4"],
                                           format_func=state.format_label("weight"),
                                           key="md_weights", accept_new_options=True,
                                           help="Also typed names such as int5, int8-asym or int4-g64.")
        values["acts"] = st.multiselect("Activation formats", state.ACT_FORMAT_CHOICES, default=["int8"],
                                        format_func=state.format_label("activation"),
                                        key="md_acts", help="'none' (or nothing): weight-only analysis.")
        c1, c2 = st.columns(2)
        values["granularity"] = c1.selectbox("Weight granularity", state.GRANULARITIES, key="md_granularity",
                                             help="For names without a suffix; per-group uses groups of 32.")
        values["samples"] = c2.number_input("Calibration samples", min_value=1, max_value=1_000_000,
                                            value=state.default_samples(), key="md_samples")
        values["wcal"] = c1.selectbox("Weight calibration", state.CALIBRATION_METHODS, key="md_wcal")
        values["acal"] = c2.selectbox("Activation calibration", state.CALIBRATION_METHODS,
                                      index=state.CALIBRATION_METHODS.index("percentile"), key="md_acal")
        with st.expander("More options"):
            values["targets"] = st.multiselect("Targets", TARGETS, default=list(TARGETS), key="md_targets",
                                               help="weights alone, input activations alone, or both together")
            values["dynamic"] = st.checkbox("Dynamic activation ranges (per token / per sample)", key="md_dynamic")
            values["fold"] = st.checkbox("Fold BatchNorm into convolutions", value=True, key="md_fold")
            values["cumulative"] = st.checkbox("Cumulative analysis (all layers quantized at once)", value=True,
                                               key="md_cumulative")
            devices = state.available_devices()
            values["device"] = st.selectbox(
                "Device", devices, key="md_device",
                help="Where the trials run: the CPU, or a GPU this server has. Results do not depend on it "
                     "beyond float rounding." + ("" if len(devices) > 1 else " No GPU was found on this server."))
            cores = state.available_workers()
            values["workers"] = st.number_input(
                "Worker processes", min_value=1, max_value=cores, value=1, step=1, key="md_workers",
                help=f"Run the sweep in this many processes (a local Ray cluster started for the run, at most "
                     f"the {cores} cores of this server), as `quantlens analyze --workers N`. Exact output "
                     "metrics are split by layer, estimated ones by chunks of samples; the table is the one "
                     "1 process writes. Starting the cluster takes several seconds: it pays on big models.")
            values["output"] = st.radio(
                "Output metrics", list(OUTPUT_MODES), key="md_output", horizontal=True,
                help="Exact re-runs the model after each layer for every trial. Estimated carries each layer's "
                     "error to the output to first order (one backward pass per projection): much faster on big "
                     "models, and marked 'estimated' in every table.")
        submitted = st.form_submit_button("Run analysis", type="primary", disabled=running, key="md_run",
                                          help="Disabled while an analysis runs." if running else None)
    if submitted:
        _submit(source, values)

with right:
    if state.session_job() is not None:
        st.subheader("Analysis in progress")
        widgets.job_panel("main", detailed=True)
    else:
        try:
            current = state.current_result()
        except Exception as exc:  # noqa: BLE001
            current = None
            st.error(f"Cannot open the selected run: {escape(state.one_line(exc))}")
        if current is None:
            st.info("No finished analysis selected yet. Run one on the left, or open a saved run in the sidebar.")
        else:
            info, result = current
            st.subheader(f"Results: {escape(info.model)}")
            frame = derived.frame(info.key, result)
            failed = int((frame["status"] == "failed").sum()) if not frame.empty else 0
            m1, m2, m3, m4 = st.columns(4)
            m1.metric("Layers analysed", len(result.layers))
            m2.metric("Skipped", len(result.skipped))
            m3.metric("Trials", len(frame), delta=f"{failed} failed" if failed else None, delta_color="inverse")
            m4.metric("Sweep time", f"{result.seconds:.1f} s", help="The sweep itself; the sidebar's time also counts loading the model and data.")
            targets = charts.swept_targets(result)
            if targets:
                metric = "output_sqnr_db" if charts.has_values(result, "output_sqnr_db") else "sqnr_db"
                fig = derived.figure("summary-bar", info.key, (metric,), lambda: charts.sensitivity_bar(
                    result, target=targets[0], metric=metric, top_n=15))
                st.plotly_chart(fig, key="summary_bar")
            st.page_link("views/sensitivity.py", label="Explore every layer and format →", icon=":material/bar_chart:")
