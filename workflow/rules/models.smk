rule convert_model:
    output:
        directory("data/models/{model}"),
    log:
        "logs/convert_model/{model}.log",
    wildcard_constraints:
        model=embedded_model_pattern(),
    conda:
        "../envs/llm.yaml"
    params:
        gguf=gguf_source,
    script:
        "../scripts/convert_model.py"


rule inspect_model:
    input:
        model=model_files,
        sample="data/processed/test_sample.tsv",
        prompt=PROMPT_FILES["zero_shot"],
        finetuned_prompt=PROMPT_FILES["finetuned"],
    output:
        "results/inspect/{model}.md",
    log:
        "logs/inspect/{model}.log",
    conda:
        "../envs/llm.yaml"
    params:
        location=model_location,
        entry=model_params,
    script:
        "../scripts/inspect_model.py"
