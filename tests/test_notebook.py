"""notebooks/quickstart.ipynb runs top to bottom, through nbclient on a CPU, its parameter cell rewritten for a tiny
random model, local GSM8K records and a few steps: nothing touches the network.

    python -m pytest tests/test_notebook.py -q
"""
import ast

import nbformat
from conftest import GSM8K, ROOT, gsm8k_records, write_jsonl
from nbclient import NotebookClient

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def parameter_cell(notebook):
    [cell] = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    return cell


def test_the_quickstart_runs_top_to_bottom_on_a_tiny_model_and_leaves_a_gguf(tiny_checkpoint, tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cell = parameter_cell(notebook)
    write_jsonl(tmp_path / "test.jsonl", gsm8k_records(4))
    parameters = dict(MODEL=str(tiny_checkpoint), DATA=str(GSM8K), TEST_DATA=str(tmp_path / "test.jsonl"),
                      SFT_STEPS=2, EVAL_LIMIT=4, RL_STEPS=1, MAX_NEW_TOKENS=12, GGUF_TYPE="q8_0",
                      OUT=str(tmp_path / "out"), INSTALL=False, REPO="",
                      SFT_EXTRA="--num_samples 16 --warmup_steps 0 --gradient_accumulation_steps 1",
                      RL_EXTRA="--prompts_per_step 2 --group_size 2 --eval_samples 2")
    assigned = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets}
    assert assigned == set(parameters)  # every parameter of the notebook gets a test value
    cell.source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    out = tmp_path / "out"
    assert "trainable params:" in text and "accuracy, 95% Wilson interval" in text  # SFT ran, eval scored
    assert (out / "lora_adapter" / "adapter_model.safetensors").exists() and (out / "sft_preds.jsonl").exists()
    assert (out / "rl_adapter" / "adapter_model.safetensors").exists()
    assert (out / "model.gguf").read_bytes()[:4] == b"GGUF" and (out / "Modelfile").read_text().startswith("FROM ")
