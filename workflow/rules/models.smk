rule convert_model:
    output:
        directory("data/models/{model}"),
    log:
        "logs/convert_model/{model}.log",
    wildcard_constraints:
        model=STUDY.embedded_pattern(),
    conda:
        "../envs/llm.yaml"
    params:
        gguf=lambda w: STUDY.gguf_source(w.model),
    script:
        "../scripts/convert_model.py"


rule inspect_model:
    input:
        model=model_files,
        sample="data/processed/test_sample.tsv",
        prompt=lambda w: STUDY.inspect_prompt(w.model),
        finetuned_prompt=PROMPT_FILES["finetuned"],
    output:
        "results/inspect/{model}.md",
    log:
        "logs/inspect/{model}.log",
    conda:
        "../envs/llm.yaml"
    params:
        entry=model_entry,
    script:
        "../scripts/inspect_model.py"
