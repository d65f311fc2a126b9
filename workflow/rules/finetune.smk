rule finetune:
    input:
        unpack(lambda w: STUDY.finetune_inputs(w.model)),
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
        model=STUDY.trainable_pattern(),
    conda:
        "../envs/llm.yaml"
    threads: all_cores()
    resources:
        gpu=1,
    params:
        entry=model_entry,
        settings=config["finetune"],
    script:
        "../scripts/finetune.py"
