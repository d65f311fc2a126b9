rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        adapter=directory("data/models/{model}-ft"),
        figure=report(
            "results/figures/finetune_loss_{model}.png",
            caption="../report/finetune_loss.rst",
            category="Fine-tuning",
            labels={"model": "{model}"},
        ),
    log:
        "logs/finetune/{model}.log",
    benchmark:
        "results/benchmarks/finetune/{model}.tsv"
    wildcard_constraints:
        model=trainable_model_pattern(),
    conda:
        "../envs/llm.yaml"
    threads: all_cores()
    resources:
        gpu=1,
    params:
        location=model_location,
        entry=model_params,
        settings=finetune_settings,
    script:
        "../scripts/finetune.py"
