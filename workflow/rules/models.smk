rule convert_model:
    output:
        directory("data/models/{model}"),
    params:
        gguf=gguf_source,
    log:
        "logs/convert_model/{model}.log",
    conda:
        "../envs/llm.yaml"
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
    params:
        location=model_location,
        entry=model_params,
    log:
        "logs/inspect/{model}.log",
    conda:
        "../envs/llm.yaml"
    script:
        "../scripts/inspect_model.py"
