"""A word count in three task types: split a document into chunks, count the words of each chunk,
merge the counts. The example of conveyor's own task types: see examples/wordcount/config.yml."""
